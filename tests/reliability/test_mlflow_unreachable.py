"""Fault: MLflow unreachable at start. A clear one-line error within seconds, exit 2, never a hang.

``MLFLOW_TRACKING_URI`` points at a closed port on 127.0.0.1. MLflow's own client retries such a
server for about 5 minutes and then raises a traceback; ``tracking.check_reachable`` (called by
``setup_mlflow``, by ``predict_cohort`` before the batch and by every job's ``session`` before Ray
starts) probes it once and raises a ``ConfigError``.
"""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: generous for a loaded 2-core machine; the hang it guards against lasts about 5 minutes
LIMIT_S = 20.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(monkeypatch, tmp_path: Path) -> str:
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BRATSTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return uri


def _main(argv: list[str], capsys) -> tuple[int, float, str]:
    """``bratstune.cli.main`` in this process, its imports warm: the time is the command's own, not
    the interpreter's start (seconds of imports on a loaded machine)."""
    from bratstune.cli import main

    importlib.import_module(f"bratstune.commands.{argv[0]}")
    capsys.readouterr()
    t0 = time.monotonic()
    code = main(argv)
    return code, time.monotonic() - t0, capsys.readouterr().err


def _check(code: int, seconds: float, err: str, uri: str, prefix: str) -> None:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err[-2000:]
    assert uri in lines[0] and "unreachable" in lines[0], lines[0]
    assert seconds < LIMIT_S, f"{seconds:.1f} s"


def test_train_with_unreachable_mlflow_fails_in_seconds(base_cohort, train_yaml, tmp_path, monkeypatch, capsys):
    uri = _env(monkeypatch, tmp_path)
    argv = ["train", "--data", str(base_cohort), "--config", str(train_yaml), "--out", str(tmp_path / "out")]
    code, seconds, err = _main([*argv, "--val-fraction", "0.34"], capsys)
    _check(code, seconds, err, uri, "bratstune train: error:")
    assert not (tmp_path / "out" / "best_model").exists()


def test_predict_with_unreachable_mlflow_fails_before_the_batch(base_cohort, tiny_model, tmp_path, monkeypatch, capsys):
    uri = _env(monkeypatch, tmp_path)
    out = tmp_path / "out"
    argv = ["predict", "--cohort", str(base_cohort), "--model", str(tiny_model), "--out", str(out)]
    code, seconds, err = _main([*argv, "--no-progress", "--no-thumbnails"], capsys)
    _check(code, seconds, err, uri, "bratstune predict: error:")
    assert not list(out.glob("*-seg.nii.gz"))  # refused before predicting, not after the whole batch


@pytest.mark.slow
def test_search_job_with_unreachable_mlflow_fails_before_ray_starts(tmp_path, monkeypatch):
    """The job as a process: exit code 2 and one line on the real stderr. Its time is mostly the
    interpreter's imports (minutes on a loaded 2-core machine), so it is not bounded here; the
    probe itself is timed by the two tests above."""
    uri = _env(monkeypatch, tmp_path)
    argv = [sys.executable, str(ROOT / "jobs" / "search_losses.py"), "--smoke-test", "--num-cpus", "1"]
    done = subprocess.run(
        [*argv, "--storage-path", str(tmp_path / "ray")], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    _check(done.returncode, 0.0, done.stderr, uri, "search_losses.py: error:")
    assert not (tmp_path / "ray").exists()  # refused before Ray or Tune started
