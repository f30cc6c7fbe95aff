"""Fault: the MLflow tracking server dies mid-search and comes back (a real ``mlflow server`` and a real local Ray).

A 2-trial smoke search of ``losses.yaml`` (4 epochs each) logs to a real ``mlflow server``. Once
both trials have logged their first epoch, the test SIGKILLs the server's process group; the
trials keep training (each logs at least two more epochs while it is down); then the server is
restarted on the same port with the same store. The search completes, and every child run holds
every epoch's metrics and its best model, and ends FINISHED: nothing was lost. (Tune may end a
trial's process right after its last report, before the server is back: what it kept on disk is
sent by the driver when the search ends.)
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from bratstune import paths
from bratstune.services.processes import wait_until

from ._by_value import load_by_value
from ._mlflow_server import MlflowServer

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow, pytest.mark.services]

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4


def _epochs(markers: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for path in markers.glob("*-*"):
        trial, epoch = path.name.rsplit("-", 1)
        out.setdefault(trial, set()).add(int(epoch))
    return out


def test_trials_keep_training_through_a_tracking_outage_and_lose_no_metric(tmp_path, monkeypatch):
    import threading

    paths.keep_ray_on_loopback()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("BRATSTUNE_MLFLOW_FLUSH_TIMEOUT_S", "600")  # trials wait for the restart
    import ray
    from mlflow.tracking import MlflowClient

    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking

    module = load_by_value("_outage_trial")
    server = MlflowServer(tmp_path / "server")
    server.start()
    experiment_id = tracking.setup_mlflow("outage-search", uri=server.uri)
    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml").smoke_variant()
    spec = spec.with_overrides(
        {"num_samples": 2, "scheduler": {"max_t": EPOCHS, "grace_period": EPOCHS}, "base": {"epochs": EPOCHS}},
        "outage",
    )
    cohort = synthetic_cohort(cases=6, shape=(48, 48, 32), root=tmp_path / "data")
    data = prepare_data(spec, cohort, cache_root=tmp_path / "cache")
    markers = tmp_path / "markers"
    markers.mkdir()
    outage: dict[str, object] = {}

    def kill_then_restart() -> None:
        if not wait_until(lambda: sum(1 in e for e in _epochs(markers).values()) >= 2, timeout=900):
            return
        server.kill()
        outage["killed_at"] = time.time()
        (markers / "killed").write_text("")
        # every trial logs two more epochs into the void before the server returns
        if wait_until(lambda: all({2, 3} <= e for e in _epochs(markers).values()), timeout=900):
            outage["during"] = {t: sorted(e) for t, e in _epochs(markers).items()}
            server.start()
            outage["restarted_at"] = time.time()

    ray.init(num_cpus=2, include_dashboard=False)
    thread = threading.Thread(target=kill_then_restart, daemon=True)
    thread.start()
    try:
        outcome = run_search(
            spec,
            data,
            storage_path=tmp_path / "results",
            name="outage",
            tracking_uri=server.uri,
            experiment_id=experiment_id,
            fit_fn=functools.partial(module.fit_through_outage, markers=str(markers)),
            verbose=0,
        )
    finally:
        ray.shutdown()
        thread.join(timeout=5)
        server.kill()
        server.start()  # read back what the restarted server holds (also if the restart above never came)

    try:
        assert "restarted_at" in outage, f"the outage did not happen as planned: {outage}"
        assert outcome.errors == 0 and all(r["status"] == "TERMINATED" for r in outcome.table), outcome.table
        client = MlflowClient(server.uri)
        children = [r for r in client.search_runs([experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2
        for run in children:
            for key in ("train/loss", "epoch"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, key, steps)
            assert run.info.status == "FINISHED", run.info
            assert run.data.tags.get("stop_reason") == "completed"
            assert client.list_artifacts(run.info.run_id, "best_model"), run.info.run_name
        # what the trials kept during the outage was sent at the end of the search, and removed
        assert not list((tmp_path / "results").rglob("mlflow-unsent*")) and not list(tmp_path.rglob("trial-*.json"))
        print(f"outage {outage['restarted_at'] - outage['killed_at']:.0f} s; epochs logged by then {outage['during']}")
    finally:
        server.kill()
