"""A local ``mlflow server`` on 127.0.0.1: the embedded SQLite store and artifact folder, served.

It serves the same store the platform writes to without a server (``<home>/mlflow.db``, artifacts
in ``<home>/mlartifacts``), so runs logged before ``bratstune up`` stay visible, and clients
upload artifacts through the server (``--serve-artifacts``). One worker, and no job consumer
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``): about 400 MiB instead of 1.1 GiB.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from bratstune import paths
from bratstune.errors import BratstuneError
from bratstune.services.processes import LOOPBACK, group_members, http_get, start_group, stop_group, wait_until

__all__ = ["mlflow_healthy", "start_mlflow_server", "stop_mlflow_server"]

DB_FILE = "mlflow.db"  # the names bratstune.tracking.runs uses for the embedded store
ARTIFACT_DIR = "mlartifacts"


def _marker(port: int) -> str:
    return f"--port {port}"


def mlflow_healthy(record: dict[str, Any], *, timeout: float = 2.0) -> bool:
    """Whether the recorded server answers ``/health`` with ``OK``."""
    status, body = http_get(f"{record['tracking_uri']}/health", timeout=timeout)
    return status == 200 and body.strip() == "OK"


def start_mlflow_server(*, port: int, log: Path, timeout: float = 90.0) -> dict[str, Any]:
    """Start the server in its own process group and wait until ``/health`` answers.

    Args:
        port: TCP port on 127.0.0.1 (free).
        log: file that receives the server's output.
        timeout: seconds to wait for ``/health``.

    Returns:
        Its record for ``endpoints.json``: ``tracking_uri``, ``pid``, ``pgid``, ``pids``, ``marker``,
        ``backend_store_uri``, ``artifacts_destination``, ``log``.

    Raises:
        BratstuneError: it exited or did not answer in time (the log's tail says why).
    """
    home = paths.home()
    home.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{home / DB_FILE}"
    artifacts = home / ARTIFACT_DIR
    artifacts.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store,
        "--artifacts-destination", str(artifacts),
        "--serve-artifacts",
        "--host", LOOPBACK,
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    process = start_group(command, log=log, env=env, cwd=home)
    record: dict[str, Any] = {
        "tracking_uri": f"http://{LOOPBACK}:{port}",
        "pid": process.pid,
        "pgid": process.pid,
        "marker": _marker(port),
        "backend_store_uri": store,
        "artifacts_destination": str(artifacts),
        "log": str(log),
    }
    if not wait_until(lambda: process.poll() is not None or mlflow_healthy(record), timeout=timeout):
        stop_group(process.pid, marker=_marker(port), pids=[process.pid])
        raise BratstuneError(
            f"mlflow server did not answer {record['tracking_uri']}/health in {timeout:.0f} s; see {log}"
        )
    if process.poll() is not None:
        raise BratstuneError(f"mlflow server exited with status {process.returncode}; see {log}")
    record["pids"] = sorted(group_members(process.pid))
    record["started_s"] = round(time.monotonic() - started, 1)
    return record


def stop_mlflow_server(record: dict[str, Any]) -> list[int]:
    """Stop the recorded server's process group; the PIDs still alive afterwards (none on success)."""
    return stop_group(int(record["pgid"]), marker=str(record["marker"]), pids=[int(p) for p in record.get("pids", [])])
