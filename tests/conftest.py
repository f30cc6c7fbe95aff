"""Shared fixtures: keep tests on one thread and every side effect inside tmp_path."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    """No test writes into the working tree's .bratstune/ or talks to a user's MLflow/Ray."""
    home = tmp_path_factory.mktemp("bratstune-home")
    monkeypatch.setenv("BRATSTUNE_HOME", str(home))
    monkeypatch.setenv("BRATSTUNE_CACHE", str(home / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _system_temp_left_clean(tmp_path_factory):
    """The session leaves no ``bratstune-*`` folder or file in the temp folder.

    Every process of the session (tests, subprocesses, Ray workers) gets a private ``TMPDIR``,
    so folders of other sessions on the machine do not count; pytest's own folders
    (``pytest-of-*``) stay where pytest put them. Checked once, after the last test.
    """
    tmp_path_factory.getbasetemp()  # pytest's folders first, in the real temp folder
    private = Path(tempfile.mkdtemp(prefix="bt-"))  # short: Ray's socket paths live under it
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(private), str(private)
    yield
    if saved[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]
    left = sorted(p.name for p in private.iterdir() if p.name.startswith("bratstune-"))
    shutil.rmtree(private, ignore_errors=True)
    assert not left, f"the test session left {len(left)} bratstune-* item(s) in the temp folder: {left[:10]}"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
