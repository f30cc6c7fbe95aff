"""Fault: the MLflow tracking server dies while a run logs its epochs (a real ``mlflow server``, SIGKILLed).

Training must go on: every epoch is buffered while the server is down and sent when it comes back
(same port, same store, as a restarted deployment). If it never comes back, what was not sent is
reported (an ERROR line and ``mlflow-unsent.json``), never dropped silently.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from bratstune.search.reporter import MlflowReporter
from bratstune.tracking.outage import replay_unsent
from bratstune.tracking.runs import setup_mlflow
from bratstune.training.report import EpochReport

from ._mlflow_server import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.mlflow, pytest.mark.services]

#: An outage must cost a logging call seconds, not MLflow's minutes of retries (a hang bound, not a speed target).
HANG_BOUND_S = 30.0


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        mlflow.set_tracking_uri(None)
        server.kill()


def _epoch(n: int, best_dir: Path | None = None) -> EpochReport:
    metrics = {"train/loss": 1.0 / n, "val/dice_mean": 0.1 * n, "epoch": float(n)}
    return EpochReport(n, metrics, None, is_best=best_dir is not None, validated=True, best_dir=best_dir)


def _run(server: MlflowServer, name: str) -> tuple[str, MlflowClient]:
    experiment_id = setup_mlflow(f"outage-{name}", uri=server.uri)
    client = MlflowClient(server.uri)
    return client.create_run(experiment_id, run_name=name).info.run_id, client


def _best(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"epoch": n}))
    return folder


def test_epochs_logged_while_the_server_is_dead_reach_it_when_it_returns(server, tmp_path):
    run_id, client = _run(server, "returns")
    reporter = MlflowReporter(run_id=run_id, artifact_path="best_model")
    reporter(_epoch(1))
    assert [m.step for m in client.get_metric_history(run_id, "val/dice_mean")] == [1]

    server.kill()
    started = time.monotonic()
    for n in (2, 3, 4):  # training goes on: each call returns, the epoch is kept
        reporter(_epoch(n, best_dir=_best(tmp_path / "best", n) if n == 3 else None))
    assert time.monotonic() - started < HANG_BOUND_S
    queued = reporter.buffer.counts
    assert queued["metrics"] == 3 * 3 and queued["artifacts"] == 1, queued
    assert reporter.buffer.outages == 1

    server.start()
    reporter(_epoch(5))  # the first call that finds the server sends the backlog, oldest first
    assert reporter.buffer.counts == {"metrics": 0, "artifacts": 0, "tags": 0, "status": 0}
    lost = reporter.close("FINISHED")
    assert lost == {"metrics": 0, "artifacts": 0, "tags": 0, "status": 0}

    client = MlflowClient(server.uri)
    for key in ("train/loss", "val/dice_mean", "epoch"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5], key
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3, 4, 5]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    best = Path(client.download_artifacts(run_id, "best_model/metrics.json", str(tmp_path / "dl")))
    assert json.loads(best.read_text()) == {"epoch": 3}  # the best model saved during the outage
    assert reporter.buffer.rejected == 0


def test_a_server_that_stays_dead_gets_the_loss_reported_and_kept_for_later(server, tmp_path, caplog):
    run_id, client = _run(server, "stays-dead")
    spool = tmp_path / "trial"
    reporter = MlflowReporter(run_id=run_id, artifact_path="best_model", spool=spool / "mlflow-unsent.json")
    reporter(_epoch(1))
    assert not spool.exists()  # nothing kept while the server takes everything
    server.kill()
    best = _best(tmp_path / "best", 2)
    reporter(_epoch(2, best_dir=best))
    assert (spool / "mlflow-unsent.json").is_file()  # kept on disk at once: the process may be killed any time
    reporter(_epoch(3))
    shutil.rmtree(best)  # the trial's folder goes when it ends; the kept copy stays
    with caplog.at_level(logging.ERROR, logger="bratstune.tracking.outage"):
        lost = reporter.close("FINISHED", timeout=1.0)
    assert lost == {"metrics": 6, "artifacts": 1, "tags": 0, "status": 1}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "6 metrics, 1 artifacts, 1 status" in errors[0] and run_id in errors[0], errors
    assert str(spool / "mlflow-unsent.json") in errors[0]
    kept = json.loads((spool / "mlflow-unsent.json").read_text())
    assert kept["run_id"] == run_id and kept["tracking_uri"] == server.uri
    metrics = [m for item in kept["items"] if item["kind"] == "metrics" for m in item["payload"]]
    assert sorted({m["step"] for m in metrics}) == [2, 3] and len(metrics) == 6
    artifacts = [item["payload"] for item in kept["items"] if item["kind"] == "artifacts"]
    assert json.loads((Path(artifacts[0][0]) / "metrics.json").read_text()) == {"epoch": 2}
    assert [item["payload"] for item in kept["items"] if item["kind"] == "terminated"] == ["FINISHED"]
    assert not list(spool.glob("*.tmp"))

    # the server returns: what was kept is sent, oldest first, and the file goes
    server.start()
    assert replay_unsent(spool) == {"metrics": 0, "artifacts": 0, "tags": 0, "status": 0}
    assert not (spool / "mlflow-unsent.json").exists()
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    got = Path(client.download_artifacts(run_id, "best_model/metrics.json", str(tmp_path / "dl")))
    assert json.loads(got.read_text()) == {"epoch": 2}


def test_a_value_the_server_refuses_is_dropped_with_a_warning_not_buffered(server, caplog):
    """A live server answering with an error is no outage: the item would never be accepted."""
    run_id, client = _run(server, "refused")
    reporter = MlflowReporter(run_id=run_id)
    with caplog.at_level(logging.WARNING, logger="bratstune.tracking.outage"):
        reporter.buffer.set_tag("x" * 300, "tag keys over 250 characters are refused")
        reporter(_epoch(1))
    assert reporter.buffer.rejected == 1 and reporter.buffer.counts["metrics"] == 0
    assert any("refused tag" in r.getMessage() for r in caplog.records)
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1]


def test_a_retried_attempt_sends_what_the_killed_one_kept_first(tmp_path):
    """Tune retries a trial killed during an outage in a new process: the queue it kept comes first.

    The killed attempt logs into a dead server (a closed port: its spool is written by the product);
    the retry, with the server back (here the same run in a SQLite store), adopts the spool.
    """
    from mlflow.entities import Metric

    from bratstune.services.processes import free_port
    from bratstune.tracking.outage import RunBuffer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(setup_mlflow("outage-retry", uri=uri)).info.run_id
    spool = tmp_path / "unsent" / "trial-t1.json"
    killed = RunBuffer(run_id, f"http://127.0.0.1:{free_port()}", spool=spool)
    killed.log_metrics([Metric("epoch", 1.0, 0, 1), Metric("epoch", 2.0, 0, 2)])
    killed.set_tag("note", "logged during the outage")
    assert spool.is_file() and killed.counts == {"metrics": 2, "artifacts": 0, "tags": 1, "status": 0}
    del killed  # SIGKILL: nothing more runs in that process

    retry = RunBuffer(run_id, uri, spool=spool)
    assert retry.counts == {"metrics": 2, "artifacts": 0, "tags": 1, "status": 0}
    retry.log_metrics([Metric("epoch", 3.0, 0, 3)])
    assert retry.counts["metrics"] == 0 and not spool.exists()
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [1, 2, 3]
    assert client.get_run(run_id).data.tags["note"] == "logged during the outage"

    spool.write_text("{not json")
    RunBuffer(run_id, uri, spool=spool)  # an unreadable file is moved aside, never deleted
    assert not spool.exists() and spool.with_name(spool.name + ".unreadable").read_text() == "{not json"
