"""Shared fixtures: keep tests on one thread and every side effect inside tmp_path."""

from __future__ import annotations

import os
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
def _one_thread():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
