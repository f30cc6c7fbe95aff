"""Fault: a search trial's worker process is SIGKILLed mid-trial; it is retried and the search completes.

A real local Ray (2 CPUs) and MLflow (SQLite) run a 3-trial smoke search of ``losses.yaml`` with
``failure.max_failures = 1``. The first trial writes its PID (``_kill_trial.py``) and waits; a
thread of the test SIGKILLs that process. Tune restarts the trial in a new worker, and it trains.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bratstune import paths

from ._by_value import load_by_value

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[2]


def _kill_when_written(marker: Path, killed: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        text = marker.read_text().split() if marker.is_file() else []
        if len(text) == 2:
            killed["trial_id"], killed["pid"] = text[0], int(text[1])
            time.sleep(0.5)  # let it be inside its sleep
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.1)


def test_sigkilled_trial_is_retried_and_the_search_completes(tmp_path, monkeypatch):
    paths.keep_ray_on_loopback()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking

    module = load_by_value("_kill_trial")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("trial-killed", uri=uri)
    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml").smoke_variant()
    spec = spec.with_changes(num_samples=3, failure=type(spec.failure)(max_failures=1))
    cohort = synthetic_cohort(cases=6, shape=(48, 48, 32), root=tmp_path / "data")
    data = prepare_data(spec, cohort, cache_root=tmp_path / "cache")
    marker, killed, stop = tmp_path / "killed-trial", {}, threading.Event()
    ray.init(num_cpus=2, include_dashboard=False)
    killer = threading.Thread(target=_kill_when_written, args=(marker, killed, stop), daemon=True)
    killer.start()
    try:
        outcome = run_search(
            spec,
            data,
            storage_path=tmp_path / "results",
            name="killed",
            tracking_uri=uri,
            experiment_id=experiment_id,
            fit_fn=functools.partial(module.wait_to_be_killed, marker=str(marker)),
            verbose=0,
        )
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "no trial was killed"
    rows = {r["trial_id"]: r for r in outcome.table}
    assert len(rows) == 3
    assert outcome.errors == 0, outcome.table
    assert all(r["status"] == "TERMINATED" for r in rows.values()), outcome.table
    assert rows[killed["trial_id"]][f"best {spec.metric}"] is not None  # the retry trained and reported
    assert outcome.best_config is not None
