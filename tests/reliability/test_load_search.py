"""Load: a search of 50 one-step trials leaks no process and leaves no MLflow run ``RUNNING``.

A real local Ray (2 CPUs, a private temp dir) and MLflow (SQLite) run the ``losses.yaml`` smoke
search through :func:`bratstune.search.tune.run_search` (the entry point of the search jobs),
cut to the tiniest trial: a unet [4, 8, 16], one epoch of one step on 16³ patches, validation on
one case, FIFO (every trial runs its one step), 4 trials at a time on half a CPU each (a trial is
mostly process start, imports and MLflow calls, so this overlaps them; and it is more processes
coming and going).

* Processes: every descendant of the test process seen while Ray runs (GCS, raylet, agents and
  every trial's worker: a thread samples the process tree twice a second) is gone within 30 s of
  ``ray.shutdown()`` (matched by PID and start time, so a reused PID is no false alarm); no new
  descendant remains; and no process on the machine names this Ray's private temp dir on its
  command line.
* MLflow: every run of the experiment (the parent and one child per trial) ends ``FINISHED``,
  ``FAILED`` or ``KILLED``; none is left ``RUNNING`` (or ``SCHEDULED``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bratstune import paths

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 50

#: the tiniest trial: one step of a 3-level unet on 16³ patches, validated on one case
TINY_TRIAL = {
    "num_samples": TRIALS,
    "max_concurrent_trials": 4,
    "resources": {"cpu": 0.5, "gpu": 0},
    "scheduler": {"type": "fifo", "max_t": 1, "grace_period": 1},
    "failure": {"max_failures": 0},
    "base": {
        "model": {"kwargs": {"filters": [4, 8, 16], "deep_supr_num": 1}},
        "data": {"patch_size": [16, 16, 16], "batch_size": 1},
        "epochs": 1,
        "steps_per_epoch": 1,
        "num_threads": 1,
        "validation": {"max_cases": 1},
    },
}


def _processes() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, start time)`` of every process (``/proc/<pid>/stat``; the start time tells reused PIDs apart)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(root: int) -> set[tuple[int, str]]:
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in table:
            found.add((pid, table[pid][1]))
            todo.extend(children.get(pid, []))
    return found


def _sample(root: int, seen: set[tuple[int, str]], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        seen |= _descendants(root)


def _alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    table = _processes()
    return {(pid, start) for pid, start in procs if pid in table and table[pid][1] == start}


def _naming(text: str) -> list[str]:
    hits = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                hits.append(f"{entry.name}: {cmdline[:200]}")
    return hits


def _describe(procs: set[tuple[int, str]]) -> list[str]:
    out = []
    for pid, _ in sorted(procs):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{pid}: {cmdline[:200]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def test_search_of_50_tiny_trials_leaks_no_process_and_no_running_run(tmp_path, monkeypatch, record_property):
    paths.keep_ray_on_loopback()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("load-search", uri=uri)  # the schema once, before the trials
    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml").smoke_variant()
    spec = spec.with_overrides(TINY_TRIAL, "load")
    cohort = synthetic_cohort(cases=4, shape=(32, 32, 24), root=tmp_path / "data")
    data = prepare_data(spec, cohort, cache_root=tmp_path / "cache")

    before = _descendants(os.getpid())
    temp = tempfile.mkdtemp(prefix="rls", dir="/tmp")  # short: Ray's socket paths have a length limit
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    seen: set[tuple[int, str]] = set()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(os.getpid(), seen, stop), daemon=True)
    sampler.start()
    try:
        outcome = run_search(
            spec,
            data,
            storage_path=tmp_path / "results",
            name="load",
            tracking_uri=uri,
            experiment_id=experiment_id,
            verbose=0,
        )
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        sampler.join()
        during = (seen | _descendants(os.getpid())) - before
        ray.shutdown()
    deadline = time.monotonic() + 30
    while (_alive(during) or _descendants(os.getpid()) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    leaked = _alive(during) | (_descendants(os.getpid()) - before)
    named = _naming(temp)
    shutil.rmtree(temp, ignore_errors=True)
    print(f"\nsearch of {TRIALS} one-step trials: {seconds:.1f} s (Ray start to the end of run_search)")
    print(f"Ray processes seen while it ran: {len(during)}; left after ray.shutdown(): {len(leaked)}")
    record_property("search_seconds", round(seconds, 1))
    record_property("ray_processes_seen", len(during))

    rows = outcome.table
    assert len(rows) == TRIALS, rows
    assert all(r["status"] == "TERMINATED" for r in rows), [r for r in rows if r["status"] != "TERMINATED"]
    assert during, "no Ray process was seen under the test process"
    assert not leaked, _describe(leaked)
    assert not named, named

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parent = client.get_run(outcome.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(runs) == TRIALS + 1, len(runs)
    assert len({c.data.tags.get("ray_trial_id") for c in children}) == TRIALS
    assert parent.info.status == "FINISHED"
    open_runs = [
        (r.info.run_name, r.info.status) for r in runs if r.info.status not in ("FINISHED", "FAILED", "KILLED")
    ]
    assert not open_runs, open_runs
