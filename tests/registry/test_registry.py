"""MLflow registry: pyfunc packaging, promotion gate, fresh-process reload, tampering, listing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bratstune.ensemble.manifest import IntegrityError
from bratstune.ensemble.promotion import CHAMPION, PREVIOUS, promote
from bratstune.ensemble.registry import load_ensemble, register_ensemble

from .conftest import make_ensemble, random_image

pytestmark = pytest.mark.mlflow

NAME = "bratstune-gli"
METRIC = "val/dice_mean"


def _register(ensemble, name: str = NAME) -> str:
    from bratstune.tracking.runs import setup_mlflow, start_run

    experiment_id = setup_mlflow("registry-test")
    with start_run(run_name="register", experiment_id=experiment_id):
        return str(register_ensemble(ensemble, name=name, metric=METRIC).version)


def _aliases(name: str = NAME) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_promotion_gate(mlflow_store, capsys):
    """Aliases, forced promotion and listing; the like-with-like comparison is tests/registry/test_promotion.py."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    v1 = _register(make_ensemble(seeds=(0,), metric=0.60))
    first = promote(NAME, v1, metric=METRIC)
    assert first.promoted and first.reason == "no champion yet"
    assert _aliases() == {CHAMPION: v1}

    # a recorded number, however high, is not evidence: without case lists there is no comparison
    v2 = _register(make_ensemble(seeds=(1,), metric=0.95))
    kept = promote(NAME, v2, metric=METRIC)
    assert not kept.promoted and "no like-with-like comparison" in kept.reason
    assert _aliases() == {CHAMPION: v1}
    assert client.get_model_version(NAME, v2).tags["promotion.decision"] == "rejected"

    # --force does, and is logged on the version; the old champion becomes 'previous'
    forced = promote(NAME, v2, metric=METRIC, force=True)
    assert forced.promoted and forced.forced and forced.previous_version == v1
    assert _aliases() == {CHAMPION: v2, PREVIOUS: v1}
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promotion.forced"] == "true" and tags["promotion.reason"].startswith("forced")

    # lineage and metric are on the version
    v4 = _register(make_ensemble(seeds=(3,), metric=0.70, lineage={"search_run_id": "abc", "cv_run_id": "def"}))
    assert promote(NAME, v4, metric=METRIC, force=True).promoted
    assert _aliases() == {CHAMPION: v4, PREVIOUS: v2}
    tags = client.get_model_version(NAME, v4).tags
    assert tags["lineage.search_run_id"] == "abc" and float(tags[f"metric.{METRIC}"]) == pytest.approx(0.70)
    assert tags["promotion.forced"] == "true" and len(tags["ensemble.digest"]) == 64

    from bratstune.cli import main

    assert main(["models", "list", "--name", NAME]) == 0
    out = capsys.readouterr().out
    assert f"{NAME}" in out and "champion" in out and "previous (forced)" in out and "0.7000" in out


def test_fresh_process_reproduces_prediction_bit_for_bit(mlflow_store, tmp_path):
    name = "bratstune-fresh"
    ensemble = make_ensemble(seeds=(0, 1), metric=0.5)
    version = _register(ensemble, name)
    promote(name, version, metric=METRIC)
    image = random_image(1)
    np.save(tmp_path / "image.npy", image)

    from mlflow.pyfunc import load_model

    model = load_model(f"models:/{name}@{CHAMPION}")
    in_process = model.unwrap_python_model().predict_probabilities(image)
    labels = model.predict(image)
    assert labels.shape == image.shape[1:] and labels.dtype == np.uint8

    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        torch.set_num_threads(1)
        import mlflow.pyfunc
        model = mlflow.pyfunc.load_model("models:/{name}@{CHAMPION}")
        image = np.load(sys.argv[1])
        np.save(sys.argv[2], model.unwrap_python_model().predict_probabilities(image))
        np.save(sys.argv[3], model.predict(image))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "image.npy"),
            str(tmp_path / "probs.npy"),
            str(tmp_path / "labels.npy"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = np.load(tmp_path / "probs.npy")
    assert fresh.dtype == np.float32 and fresh.shape == (3, *image.shape[1:])
    assert np.array_equal(fresh, in_process)  # bit for bit
    assert np.array_equal(np.load(tmp_path / "labels.npy"), labels)


def test_tampered_registered_weights_are_refused(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    name = "bratstune-tamper"
    version = _register(make_ensemble(seeds=(0,), metric=0.5), name)
    promote(name, version, metric=METRIC)
    loaded = load_ensemble(f"models:/{name}@{CHAMPION}", dst=tmp_path / "dl")
    assert (loaded.name, loaded.version) == (name, version)
    # tamper with the stored artifact of this version itself (what every later download gets)
    client = MlflowClient()
    location = client.get_model_version_download_uri(name, version)
    store = Path(location[len("file://") :]) if location.startswith("file://") else Path(location)
    stored = list(store.rglob("00-seed0.safetensors"))
    assert len(stored) == 1, stored
    for path in stored:
        blob = bytearray(path.read_bytes())
        blob[-3] ^= 0x55
        path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"00-seed0\.safetensors: SHA-256 mismatch"):
        load_ensemble(f"models:/{name}@{CHAMPION}", dst=tmp_path / "dl2")
    from mlflow.pyfunc import load_model

    with pytest.raises(IntegrityError, match="refusing to load"):
        load_model(f"models:/{name}/{version}")


def test_promote_job_from_member_folders(mlflow_store, tmp_path, capsys):
    """jobs/promote_ensemble.py with two trained-model folders and a training cohort."""
    import torch

    from bratstune.data.synthetic import generate_cohort
    from bratstune.training.checkpoint import save_best

    from .conftest import make_member

    folders = []
    for seed, value in ((0, 0.4), (1, 0.6)):
        member = make_member(seed)
        folders.append(
            save_best(
                tmp_path / f"m{seed}" / "best",
                model=member.model,
                config=dict(member.config),
                metrics={METRIC: value, "epoch": 1.0},
            )
        )
    generate_cohort(tmp_path / "train", cases=2, shape=(32, 32, 32), anatomy="procedural", workers=1)
    (tmp_path / "post.yaml").write_text("thresholds: {WT: 0.45, ET: 0.55}\npostprocess: {min_size: {ET: 4}}\n")
    job = Path(__file__).resolve().parents[2] / "jobs" / "promote_ensemble.py"
    sys.path.insert(0, str(job.parent))
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("promote_ensemble_job", job)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        code = module.main(
            [
                "--members",
                *map(str, folders),
                "--name",
                "bratstune-job",
                "--data",
                str(tmp_path / "train"),
                "--tta",
                "none",
                "--thresholds",
                str(tmp_path / "post.yaml"),
                "--search-run",
                "s123",
            ]
        )
    finally:
        sys.path.remove(str(job.parent))
    assert code == 0
    out = capsys.readouterr().out
    assert "registered bratstune-job version 1" in out and "champion -> version 1" in out
    loaded = load_ensemble(f"models:/bratstune-job@{CHAMPION}", dst=tmp_path / "dl")
    ens = loaded.ensemble
    assert ens.metrics[METRIC] == pytest.approx(0.5)  # mean of the members
    assert ens.thresholds == {"WT": 0.45, "TC": 0.5, "ET": 0.55} and ens.postprocess.min_size == {"ET": 4}
    assert ens.training_fingerprint["cases"] == 2 and "t2f" in ens.training_fingerprint["intensity"]
    assert ens.lineage["search_run_id"] == "s123" and len(ens.lineage["data_fingerprint"]) == 16
    assert len(ens.inference.views()) == 1
    del torch
