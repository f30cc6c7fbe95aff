"""Load: ``bratstune predict --workers 2`` over 200 small cases; the workers' memory does not grow.

The real console script runs as a child process over a 200-case synthetic GLI cohort (32 x 32 x 24
voxels, real NIfTI files) with the fixed-weight one-member package of ``conftest.py``: a local Ray
(its own temp dir, ``RAY_TMPDIR``) with two ``CasePredictor`` actors, ``--threads 1``, thumbnails
and report on (the defaults), no MLflow run.

Every result row carries its worker's PID and peak RSS so far (``worker_pid``, ``peak_rss_mb``:
``ru_maxrss``, the kernel's ``VmHWM``), and the ledger lists the cases in the order they finished.
So the peak of each worker after the batch's first 50 cases and after all 200 are read from one
run of the same two processes. A leak of a few hundred kB per case (an unclosed matplotlib figure,
a cached volume) would show as growth; the bound is RSS(200) < 1.3 x RSS(50) + 50 MB.

Throughput is reported twice: the whole command (imports, Ray start, model load, 200 cases,
tables and report) and the steady state between the 50th and the 200th finished case (the rows'
``finished`` stamps, 1 s resolution). Both are printed and recorded (``record_property``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from ._defects import valid_cohort

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.ray]

CASES = 200
EARLY = 50
SCRIPT = Path(sys.executable).parent / "bratstune"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("load") / "cohort"
    valid_cohort(root, cases=CASES, seed=13)
    return root


def _naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stamp(row: dict) -> float:
    return datetime.strptime(row["finished"], "%Y-%m-%dT%H:%M:%S").timestamp()


def test_200_cases_with_2_ray_workers_memory_does_not_grow(cohort, tiny_model, tmp_path, record_property):
    out = tmp_path / "out"
    temp = tempfile.mkdtemp(prefix="rlp", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {
        **os.environ,
        "BRATSTUNE_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
        "RAY_TMPDIR": temp,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    argv = [str(SCRIPT), "predict", "--cohort", str(cohort), "--model", str(tiny_model), "--out", str(out)]
    argv += ["--workers", "2", "--threads", "1", "--no-mlflow", "--no-progress"]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        wall = time.perf_counter() - started
        deadline = time.monotonic() + 30  # the command's Ray (GCS, raylet, workers) must go with it
        while _naming(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _naming(temp)
        used = sorted(p.name for p in Path(temp).glob("ray/session_*"))  # the check above looked in the right place
    finally:
        for pid in _naming(temp):  # only the processes of this test's Ray, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert used, f"the command's Ray did not use {temp}"
    assert not left, f"processes of the command's Ray left after it exited: {left}"

    ledger = json.loads((out / "ledger.json").read_text())["cases"]  # in the order the cases finished
    assert len(ledger) == CASES and all(e["status"] == "done" for e in ledger.values())
    rows = [e["row"] for e in ledger.values()]
    table = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(table) == CASES and all(r["worker_pid"] and r["peak_rss_mb"] for r in table)
    workers = sorted({r["worker_pid"] for r in rows})
    assert len(workers) == 2, workers  # two actors, none replaced

    peaks = {}
    for pid in workers:
        mine = [r for r in rows if r["worker_pid"] == pid]
        early = [r for r in rows[:EARLY] if r["worker_pid"] == pid]
        assert len(early) >= EARLY // 4, f"worker {pid} did {len(early)} of the first {EARLY} cases"
        assert [r["peak_rss_mb"] for r in mine] == sorted(r["peak_rss_mb"] for r in mine)  # a peak never falls
        peaks[pid] = (early[-1]["peak_rss_mb"], mine[-1]["peak_rss_mb"], len(mine))
    steady = (CASES - EARLY) / max(1.0, _stamp(rows[-1]) - _stamp(rows[EARLY - 1]))
    overall = CASES / wall
    for n, (pid, (at_early, at_end, count)) in enumerate(sorted(peaks.items())):
        print(
            f"\nworker {n} (pid {pid}, {count} cases): peak RSS {at_early:.1f} MiB after {EARLY} cases, {at_end:.1f} MiB after {CASES}"
        )
        record_property(f"worker{n}_peak_rss_mb_{EARLY}", at_early)
        record_property(f"worker{n}_peak_rss_mb_{CASES}", at_end)
    print(f"throughput: {overall:.2f} cases/s for the whole command ({wall:.1f} s), {steady:.2f} cases/s steady state")
    record_property("cases_per_s_overall", round(overall, 2))
    record_property("cases_per_s_steady", round(steady, 2))
    record_property("command_seconds", round(wall, 1))
    for pid, (at_early, at_end, _) in peaks.items():
        assert at_end < 1.3 * at_early + 50, f"worker {pid}: peak RSS grew from {at_early} to {at_end} MiB"
