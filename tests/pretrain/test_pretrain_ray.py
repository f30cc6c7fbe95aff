"""``jobs/pretrain_mae.py`` end to end on a real local Ray: 2 CPU workers (gloo DDP), SIGKILL, resume.

One module fixture runs the job twice on a tiny synthetic cohort (two folders, two challenges):
the first run is killed (SIGKILL of its whole process group, Ray included) once the first
per-epoch checkpoint is registered; the second run, with the same name, resumes from it and
finishes (export, MLflow, registry). The tests then check the resume, the DDP lock-step of the
workers, the MLflow record and that the registered encoder loads into ``unetr`` completely.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[2]
NAME = "kill-resume"
EPOCHS = 3


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_naming(text: str) -> None:
    for pid in _pids_naming(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _registered_checkpoints(run_dir: Path) -> int:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text()).get("checkpoint_results") or [])
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from bratstune.data.synthetic import generate_cohort

    home = tmp_path_factory.mktemp("mae-home")
    generate_cohort(home / "gli", challenge="GLI", cases=3, shape=(32, 32, 32), seed=0, anatomy="procedural")
    generate_cohort(home / "ped", challenge="PED", cases=1, shape=(32, 32, 32), seed=0, anatomy="procedural")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(
        BRATSTUNE_HOME=str(home),
        BRATSTUNE_CACHE=str(home / "cache"),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    temp_dirs = [tempfile.mkdtemp(prefix="rmae", dir="/tmp") for _ in range(2)]

    def command(temp_dir: str) -> list[str]:
        return [
            sys.executable,
            str(ROOT / "jobs" / "pretrain_mae.py"),
            "--smoke-test",
            "--workers",
            "2",
            "--data",
            str(home / "gli"),
            str(home / "ped"),
            "--num-cpus",
            "2",
            "--ray-temp-dir",
            temp_dir,
            "--name",
            NAME,
            "--storage-path",
            str(home / "runs"),
            "--param-digest-dir",
            str(home / "digests"),
            "--set",
            f"epochs={EPOCHS}",
            "--set",
            "steps_per_epoch=12",
        ]

    run_dir = home / "runs" / NAME
    timings = {}
    try:
        start = time.monotonic()
        with open(home / "first.log", "w") as log:
            first = subprocess.Popen(
                command(temp_dirs[0]), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            deadline = time.monotonic() + 300
            while _registered_checkpoints(run_dir) < 1:
                if first.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"first run ended/timed out before a checkpoint:\n{(home / 'first.log').read_text()[-4000:]}"
                    )
                time.sleep(0.1)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        _kill_naming(temp_dirs[0])
        killed_after = _registered_checkpoints(run_dir)
        timings["first_s"] = time.monotonic() - start
        assert not (run_dir / "bratstune" / "export").exists(), "the first run finished before it was killed"
        start = time.monotonic()
        second = subprocess.run(command(temp_dirs[1]), cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        timings["second_s"] = time.monotonic() - start
        if second.returncode != 0:
            pytest.fail(f"resumed run failed ({second.returncode}):\n{second.stdout[-3000:]}\n{second.stderr[-6000:]}")
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        yield {"home": home, "summary": summary, "killed_after": killed_after, "timings": timings, "log": second.stderr}
    finally:
        for temp_dir in temp_dirs:
            _kill_naming(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_killed_run_resumes_from_its_checkpoint(runs):
    summary = runs["summary"]
    assert runs["killed_after"] >= 1
    assert summary["starts"][0] == 0 and len(summary["starts"]) == 2
    assert 1 <= summary["starts"][1] < EPOCHS  # the second worker group began after a checkpointed epoch
    assert [row["epoch"] for row in summary["history"]] == [1.0, 2.0, 3.0]
    assert "resuming MAE pre-training after epoch" in runs["log"]


def test_both_workers_trained_in_ddp_lockstep(runs):
    digests = runs["home"] / "digests"
    by_step: dict[int, dict[int, dict]] = {}
    for path in digests.glob("rank*-step*.json"):
        record = json.loads(path.read_text())
        by_step.setdefault(record["step"], {})[record["rank"]] = record
    assert set(by_step) == set(range(1, EPOCHS * 12 + 1))
    for step, ranks in by_step.items():
        assert set(ranks) == {0, 1}, step
        assert ranks[0]["params"] == ranks[1]["params"], f"parameters differ between workers after step {step}"
        assert ranks[0]["batch"] != ranks[1]["batch"], f"workers saw the same batch at step {step}"
    assert by_step[1][0]["params"] != by_step[2][0]["params"]  # and they did train
    for row in runs["summary"]["history"]:
        assert row["ddp/params_in_sync"] == 1.0 and row["ddp/world_size"] == 2.0


def test_mlflow_run_records_scaling_history_and_artifacts(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    summary = runs["summary"]
    client = MlflowClient(f"sqlite:///{runs['home'] / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.workers"] == "2"
    assert run.data.params["scaling.effective_batch_size"] == "4"
    assert float(run.data.params["scaling.lr_scale"]) == 2.0
    assert run.data.tags["resumed_from_epoch"] == str(summary["starts"][-1])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert {"encoder/encoder.pt", "encoder/encoder.json", "encoder/reconstruction.png"} <= artifacts
    assert Path(summary["reconstruction"]).stat().st_size > 5000


def test_registered_encoder_loads_into_unetr_with_every_tensor_accounted_for(runs, monkeypatch):
    from bratstune.errors import DataError
    from bratstune.labels import get_scheme
    from bratstune.tracking.artifacts import localise_config
    from bratstune.training.config import load_train_config
    from bratstune.training.network import prepare_network

    from .conftest import TINY_UNETR

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{runs['home'] / 'mlflow.db'}")
    config = load_train_config(
        {
            "model": {"name": "unetr", "kwargs": {k: v for k, v in TINY_UNETR.items() if k != "patch_size"}},
            "data": {"patch_size": [32, 32, 32]},
            "init": {"encoder_from": "models:/bratstune-mae-encoder@latest", "require_complete": True},
        }
    )
    with pytest.raises(DataError, match="must be downloaded before training"):
        prepare_network(config, get_scheme("brats2023"))  # training itself never talks to MLflow
    local, _ = localise_config(config.to_dict(), dst=runs["home"] / "init")
    model = prepare_network(load_train_config(local), get_scheme("brats2023"))
    report = model.bratstune_init_report
    vit_keys = sorted(k for k in model.state_dict() if k.startswith("vit."))
    assert sorted(report.encoder_tensors) == vit_keys
    assert sorted(report.loaded) == vit_keys
    assert not (report.interpolated or report.mismatched or report.unexpected or report.missing)
    exported = torch.load(runs["summary"]["encoder"], weights_only=True)["state_dict"]
    state = model.state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in vit_keys)
    # the run id works as a source too
    from bratstune.models.encoder_init import load_encoder_weights
    from bratstune.tracking.artifacts import resolve_artifact

    resolved = resolve_artifact(runs["summary"]["run_id"], default_artifact="encoder")
    try:
        assert load_encoder_weights(model, resolved.path).complete
    finally:
        resolved.cleanup()  # the caller owns a temporary download
