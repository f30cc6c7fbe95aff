"""A trial's device follows its own GPU request, on a real Ray with a simulated GPU node.

``ray.init(num_gpus=1)`` with ``CUDA_VISIBLE_DEVICES=0``: two Tune trials, one asking for
``gpu: 0`` and one for ``gpu: 0.25``, each choosing its device with
:func:`bratstune.search.trial.trial_device` (what ``run_trial`` calls). The first sees the GPU
(Ray does not hide it) and must still run on the CPU; the second must read its 0.25 share and cap
its CUDA memory at that fraction. See ``tests/cluster/_gpu_probe.py`` for what stands in for CUDA.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_trials_choose_their_device_from_their_own_gpu_share(monkeypatch, tmp_path, ray_env, cluster_helper):
    import ray
    from ray import tune

    probe = cluster_helper("_gpu_probe")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    temp_dir = tempfile.mkdtemp(prefix="bgpu", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        tuner = tune.Tuner(
            tune.with_resources(probe.report_device, lambda config: {"cpu": 1, "gpu": config["gpu"]}),
            param_space={"gpu": tune.grid_search([0.0, 0.25]), "device": "auto"},
            run_config=tune.RunConfig(name="gpu-share", storage_path=str(tmp_path / "results"), verbose=0),
        )
        results = {r.metrics["asked"]: r.metrics for r in tuner.fit()}
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    none, quarter = results[0.0], results[0.25]
    # no share: the GPU is visible to the trial, yet it trains on the CPU and caps nothing
    assert none["cuda_visible_devices"] == "0"
    assert none["share"] == 0.0 and none["device"] == "cpu" and none["memory_cap"] == -1.0
    # a quarter share: read from Ray, CUDA chosen, memory capped at a quarter of the device
    assert quarter["share"] == 0.25 and quarter["device"] == "cuda" and quarter["memory_cap"] == 0.25
