"""Faults in batch prediction: ``bratstune predict`` SIGKILLed mid-cohort, and the disk full while writing.

Both run the real console script as a child process over a 10-case tiny cohort with the fixed-weight
one-member package of ``conftest.py`` (``--threads 1``, so every run computes the same floats), and
compare every output with a clean run's **file bytes** (nibabel writes gzip with mtime 0 and no
file name, so equal voxels, affine and header give equal bytes; a mismatch is reported by the
decoded arrays and headers as well).

* SIGKILL: the process is killed as soon as the ledger records its first finished case. The re-run
  predicts only the cases the ledger does not have (the finished outputs keep their inode and
  mtime), and no partial or hidden temporary file remains.
* Disk full: ``RLIMIT_FSIZE`` in the child (``SIGXFSZ`` ignored, so a write past the limit fails
  with ``EFBIG`` as on a full disk; a tmpfs cannot be mounted as this user). Its own 3-case cohort
  has 96 x 96 x 72 voxels, so that a segmentation (about 60 kB) is larger than every bookkeeping
  file (ledger, tables, report, the 29 kB summary plot); the limit lies between the two, so every
  segmentation write fails. The ledger marks no case done (nor failed: a full disk is not the
  case's fault), no partial file remains, and the re-run without the limit completes.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ._defects import valid_cohort

pytestmark = [pytest.mark.stack, pytest.mark.slow]

CASES = 10
SCRIPT = Path(sys.executable).parent / "bratstune"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-faults") / "cohort"
    valid_cohort(root, cases=CASES, seed=11)
    return root


def _argv(cohort: Path, model: Path, out: Path) -> list[str]:
    return [str(SCRIPT), "predict", "--cohort", str(cohort), "--model", str(model), "--out", str(out)] + [
        "--threads",
        "1",
        "--no-mlflow",
        "--no-progress",
        "--no-thumbnails",
    ]


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "BRATSTUNE_HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _clean_run(cohort: Path, model: Path, tmp: Path, cases: int) -> Path:
    out = tmp / "out"
    done = subprocess.run(_argv(cohort, model, out), capture_output=True, text=True, env=_env(tmp), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.glob("*-seg.nii.gz"))) == cases
    return out


@pytest.fixture(scope="module")
def clean(cohort, tiny_model, tmp_path_factory) -> Path:
    return _clean_run(cohort, tiny_model, tmp_path_factory.mktemp("batch-clean"), CASES)


@pytest.fixture(scope="module")
def big_cohort(tmp_path_factory) -> Path:
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("batch-big") / "cohort"
    generate_cohort(root, challenge="GLI", cases=3, shape=(96, 96, 72), anatomy="procedural", seed=5, workers=1)
    return root


def _ledger(out: Path) -> dict:
    try:
        return json.loads((out / "ledger.json").read_text()).get("cases", {})
    except (OSError, ValueError):
        return {}


def _litter(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".bratstune-work")]


def _assert_same_as_clean(out: Path, clean: Path) -> None:
    names = sorted(p.name for p in clean.glob("*-seg.nii.gz"))
    assert sorted(p.name for p in out.glob("*-seg.nii.gz")) == names
    for name in names:
        if (out / name).read_bytes() != (clean / name).read_bytes():
            a, b = nib.load(out / name), nib.load(clean / name)
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), f"{name}: voxels differ"
            assert np.array_equal(a.affine, b.affine), f"{name}: affine differs"
            assert a.header.binaryblock == b.header.binaryblock, f"{name}: header differs"
            pytest.fail(f"{name}: same voxels, affine and header, but the file bytes differ")


def test_sigkill_mid_cohort_then_rerun_predicts_only_the_missing_cases(cohort, tiny_model, clean, tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen(
        _argv(cohort, tiny_model, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(tmp_path)
    )
    deadline = time.monotonic() + 500
    while child.poll() is None and time.monotonic() < deadline:
        if any(e.get("status") == "done" for e in _ledger(out).values()):
            break
        time.sleep(0.02)
    assert child.poll() is None, "the batch finished before the kill: " + child.stderr.read().decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    finished = {c: e for c, e in _ledger(out).items() if e.get("status") == "done"}
    assert 1 <= len(finished) < CASES
    kept = {c: (out / e["output"]).stat() for c, e in finished.items()}
    time.sleep(0.05)  # a rewritten file would get a later mtime

    done = subprocess.run(
        _argv(cohort, tiny_model, out), capture_output=True, text=True, env=_env(tmp_path), timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case_id, before in kept.items():  # not predicted again
        after = (out / finished[case_id]["output"]).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), case_id
    ledger = _ledger(out)
    assert len(ledger) == CASES and all(e["status"] == "done" for e in ledger.values())
    assert not _litter(out), _litter(out)
    _assert_same_as_clean(out, clean)


def test_disk_full_while_writing_a_prediction(big_cohort, tiny_model, tmp_path):
    cohort, cases = big_cohort, 3
    clean = _clean_run(cohort, tiny_model, tmp_path / "clean", cases)
    seg_sizes = [p.stat().st_size for p in clean.glob("*-seg.nii.gz")]
    other = [p.stat().st_size for p in clean.rglob("*") if p.is_file() and not p.name.endswith("-seg.nii.gz")]
    limit = min(seg_sizes) - 1
    assert max(other) < limit, f"bookkeeping files ({max(other)} B) are not smaller than the segmentations ({limit} B)"

    def full_disk() -> None:  # in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "full"
    done = subprocess.run(
        _argv(cohort, tiny_model, out),
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=600,
        preexec_fn=full_disk,
    )
    assert done.returncode == 1, done.stderr[-3000:]  # every case failed, none lost
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not list(out.glob("*-seg.nii.gz"))
    assert not _litter(out), _litter(out)  # no partial file
    assert not _ledger(out), _ledger(out)  # neither done nor (permanently) failed
    failures = (out / "failures.csv").read_text()
    assert failures.count("File too large") == cases, failures

    done = subprocess.run(
        _argv(cohort, tiny_model, out), capture_output=True, text=True, env=_env(tmp_path), timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(e["status"] == "done" for e in _ledger(out).values()) and len(_ledger(out)) == cases
    assert not _litter(out)
    _assert_same_as_clean(out, clean)
