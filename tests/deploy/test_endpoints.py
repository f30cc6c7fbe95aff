"""``bratstune.paths.endpoints``: the addresses ``bratstune up`` recorded, used only while they run.

No services here: the record is written by hand, with this test process standing in for a live
server and a PID that no longer exists standing in for a stopped one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bratstune import paths
from bratstune.services import mlflow_server
from bratstune.tracking import runs


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _record(mlflow_pid: int, ray_pid: int) -> None:
    record = {
        "version": 1,
        "mlflow": {"tracking_uri": "http://127.0.0.1:5999", "pid": mlflow_pid},
        "ray": {"address": "127.0.0.1:6999", "pid": ray_pid},
    }
    paths.endpoints_file().parent.mkdir(parents=True, exist_ok=True)
    paths.endpoints_file().write_text(json.dumps(record))


def test_no_record_means_no_endpoints_and_the_embedded_store():
    assert paths.endpoints() == {}
    assert runs.tracking_uri() == f"sqlite:///{paths.home() / 'mlflow.db'}"


def test_live_services_are_used_after_the_environment_and_before_the_embedded_store(monkeypatch):
    _record(os.getpid(), os.getpid())
    assert paths.endpoints() == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "RAY_ADDRESS": "127.0.0.1:6999"}
    assert runs.tracking_uri() == "http://127.0.0.1:5999"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert runs.tracking_uri() == "sqlite:////elsewhere/mlflow.db"  # an explicit address wins


def test_stopped_services_are_ignored():
    _record(_dead_pid(), os.getpid())
    assert paths.endpoints() == {"RAY_ADDRESS": "127.0.0.1:6999"}
    assert runs.tracking_uri().startswith("sqlite:///")


def test_unreadable_record_is_ignored():
    paths.endpoints_file().parent.mkdir(parents=True, exist_ok=True)
    paths.endpoints_file().write_text("{not json")
    assert paths.endpoints() == {}


def test_use_endpoints_sets_only_what_is_unset():
    _record(os.getpid(), os.getpid())
    env = {"MLFLOW_TRACKING_URI": "http://explicit:5000"}
    applied = paths.use_endpoints(env)
    assert applied == {"RAY_ADDRESS": "127.0.0.1:6999", "RAY_AUTH_MODE": "disabled"}
    assert env == {"MLFLOW_TRACKING_URI": "http://explicit:5000", **applied}
    assert paths.use_endpoints(env) == {}  # idempotent


def test_server_serves_the_embedded_store():
    """``bratstune up`` serves the same SQLite store and artifact folder as the embedded default."""
    assert mlflow_server.DB_FILE == runs.DB_FILE
    assert mlflow_server.ARTIFACT_DIR == runs.ARTIFACT_DIR


def test_a_shared_server_counts_while_the_head_runs():
    """``bratstune up`` with ``$MLFLOW_TRACKING_URI`` set records that server (``external``), no PID."""
    record = {"mlflow": {"tracking_uri": "https://mlflow.example.org", "external": True}}
    paths.endpoints_file().parent.mkdir(parents=True, exist_ok=True)
    for ray_pid, expected in ((os.getpid(), "https://mlflow.example.org"), (_dead_pid(), None)):
        record["ray"] = {"address": "127.0.0.1:6999", "pid": ray_pid}
        paths.endpoints_file().write_text(json.dumps(record))
        assert paths.endpoints().get("MLFLOW_TRACKING_URI") == expected
