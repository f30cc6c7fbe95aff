"""bratstune.tracking.runs against a real SQLite MLflow store in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bratstune.data.fingerprint import data_fingerprint
from bratstune.search.reporter import MlflowReporter
from bratstune.tracking import runs as tracking
from bratstune.training.config import load_train_config
from bratstune.training.report import EpochReport

pytestmark = pytest.mark.mlflow


def test_tracking_uri_default_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BRATSTUNE_HOME", str(tmp_path / "home"))
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'home').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None
    assert tracking.artifact_location("sqlite:////x/y/mlflow.db") == "file:///x/y/mlartifacts"


def test_flatten_nested_config():
    flat = tracking.flatten({"loss": {"weights": {"dice": 1.0}, "mode": "region"}, "freeze": [], "kw": {}, "x": None})
    assert flat == {"loss.weights.dice": "1.0", "loss.mode": "region", "freeze": "[]", "kw": "{}", "x": "None"}


def test_data_fingerprint_is_order_free_and_config_sensitive():
    a = data_fingerprint(["b", "a"], {"normalize": "zscore"})
    assert a == data_fingerprint(["a", "b"], {"normalize": "zscore"})
    assert a != data_fingerprint(["a", "b"], {"normalize": "none"})
    assert len(a) == 16


def test_run_logs_params_metrics_tags_and_artifacts(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("unit", uri=uri)
    assert tracking.setup_mlflow("unit", uri=uri) == experiment_id  # idempotent
    client = MlflowClient(uri)
    location = client.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "store" / "mlartifacts").resolve().as_uri()  # absolute, next to the db

    best = tmp_path / "best"
    best.mkdir()
    (best / "model.pt").write_bytes(b"weights")
    (best / "metrics.json").write_text(json.dumps({"val/dice_mean": 0.5}))
    config = load_train_config({"loss": {"weights": {"dice": 1.0, "ce": 0.5}}, "epochs": 2})

    with tracking.start_run(run_name="r", experiment_id=experiment_id, data_fingerprint="abc123", config=config) as run:
        reporter = MlflowReporter()
        reporter(
            EpochReport(1, {"train/loss": 1.0, "val/dice_mean": 0.5, "time/compute_s": 0.1}, None, True, True, best)
        )
        reporter(
            EpochReport(
                2, {"train/loss": 0.5, "val/dice_mean": 0.5, "val/dice_ET": float("nan")}, None, False, False, best
            )
        )
        run_id = run.info.run_id
    assert mlflow.active_run() is None

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["loss.weights.ce"] == "0.5"
    assert got.data.params["epochs"] == "2"
    assert got.data.params["model.name"] == "unet"
    assert got.data.tags["data.fingerprint"] == "abc123"
    assert "version.torch" in got.data.tags and "hardware.cpu_count" in got.data.tags
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [1.0, 0.5]
    # validation metrics only from validated epochs; NaN skipped
    assert [m.step for m in client.get_metric_history(run_id, "val/dice_mean")] == [1]
    assert client.get_metric_history(run_id, "val/dice_ET") == []
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "best_model"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "best_model")} == {
        "best_model/model.pt",
        "best_model/metrics.json",
    }
    logged = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))).read_text())
    assert logged["loss"]["weights"] == {"dice": 1.0, "ce": 0.5}


def test_failed_and_stopped_runs_end_with_the_right_status(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("status", uri=uri)
    ids = {}
    for name, exc in (("failed", RuntimeError("boom")), ("stopped", SystemExit(0))):
        with pytest.raises(type(exc)):
            with tracking.start_run(run_name=name, experiment_id=experiment_id) as run:
                ids[name] = run.info.run_id
                raise exc
    client = MlflowClient(uri)
    assert client.get_run(ids["failed"]).info.status == "FAILED"
    assert client.get_run(ids["stopped"]).info.status == "FINISHED"  # how Ray Tune stops a trial


def test_child_run_links_to_parent(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("nest", uri=uri)
    with tracking.start_run(run_name="parent", experiment_id=experiment_id) as parent:
        parent_id = parent.info.run_id
    with tracking.start_run(run_name="child", experiment_id=experiment_id, parent_run_id=parent_id) as child:
        child_id = child.info.run_id
    assert MlflowClient(uri).get_run(child_id).data.tags["mlflow.parentRunId"] == parent_id
