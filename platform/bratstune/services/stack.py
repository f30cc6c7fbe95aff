"""``bratstune up`` / ``down`` / ``status``: a local Ray head and MLflow server, recorded in one file.

``up`` starts the MLflow server first (unless ``$MLFLOW_TRACKING_URI`` names a shared one, which
is then used instead), then the Ray head (whose processes inherit the server's address), and
writes both records to ``<home>/endpoints.json`` (:func:`bratstune.paths.endpoints`
reads it; ``tracking_uri()`` and the jobs pick the addresses up from there). ``down`` stops exactly
the recorded process groups, by id, and removes the file. ``status`` reports each service: whether
its recorded process is alive and whether it answers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bratstune import paths
from bratstune.errors import BratstuneError
from bratstune.services.mlflow_server import mlflow_healthy, start_mlflow_server, stop_mlflow_server
from bratstune.services.processes import free_port, http_get, is_alive, port_in_use
from bratstune.services.ray_head import head_environment, ray_healthy, start_ray_head, stop_ray_head, stop_ray_jobs

logger = logging.getLogger(__name__)

__all__ = ["ServiceState", "UpOptions", "down", "read_record", "status", "up"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class UpOptions:
    """What ``bratstune up`` starts. A port of 0 takes any free one."""

    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    num_cpus: int | None = None
    num_gpus: int | None = None
    ray_temp_dir: Path | None = None
    timeout: float = 120.0


@dataclass(frozen=True)
class ServiceState:
    """One service as ``status`` sees it."""

    name: str
    address: str
    pid: int
    alive: bool
    healthy: bool
    detail: str


def read_record() -> dict[str, Any] | None:
    """The parsed ``endpoints.json`` (whatever its processes' state), or ``None`` if there is none."""
    try:
        record = json.loads(paths.endpoints_file().read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BratstuneError(f"{paths.endpoints_file()}: unreadable ({exc}); delete it after checking `ps`") from exc
    return record if isinstance(record, dict) else None


def _write_record(record: dict[str, Any]) -> None:
    target = paths.endpoints_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(target)


def _port(requested: int, what: str, flag: str) -> int:
    if requested == 0:
        return free_port()
    if port_in_use(requested):
        raise BratstuneError(f"port {requested} on 127.0.0.1 is taken (another {what}?): choose {flag} (0 = any free)")
    return requested


def up(options: UpOptions) -> dict[str, Any]:
    """Start the MLflow server and the Ray head on 127.0.0.1 and record them.

    With ``$MLFLOW_TRACKING_URI`` set (a shared server), no MLflow server is started: the record
    names that one (``external``) and the head's processes log there.

    Returns:
        The record written to ``endpoints.json``.

    Raises:
        BratstuneError: something recorded still runs (``bratstune down`` first), a port is taken,
            or a service failed to start (whatever had started is stopped again).
    """
    previous = read_record()
    if previous is not None and any(s.alive and s.pid for s in status(previous)):
        raise BratstuneError(f"services recorded in {paths.endpoints_file()} still run: `bratstune down` first")
    home = paths.home()
    logs = home / "logs"
    external = os.environ.get("MLFLOW_TRACKING_URI")  # a shared server: use it, start none
    mlflow_port = 0 if external else _port(options.mlflow_port, "MLflow server", "--mlflow-port")
    ray_port = _port(options.ray_port, "Ray head", "--ray-port")
    dashboard_port = _port(options.dashboard_port, "Ray dashboard", "--dashboard-port")
    owned_temp = options.ray_temp_dir is None
    temp_dir = Path(tempfile.mkdtemp(prefix="bratstune-ray-", dir="/tmp")) if owned_temp else options.ray_temp_dir
    record: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "home": str(home),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if external:
        record["mlflow"] = {"tracking_uri": external, "external": True}
    else:
        record["mlflow"] = start_mlflow_server(
            port=mlflow_port, log=logs / "mlflow-server.log", timeout=options.timeout
        )
        _write_record(record)  # a crash from here on still leaves the server findable by `bratstune down`
    try:
        ray = start_ray_head(
            port=ray_port,
            dashboard_port=dashboard_port,
            temp_dir=Path(temp_dir),
            log=logs / "ray-start.log",
            env=head_environment(record["mlflow"]["tracking_uri"], home),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
            timeout=options.timeout,
        )
    except BaseException:
        if not external:
            stop_mlflow_server(record["mlflow"])
        paths.endpoints_file().unlink(missing_ok=True)
        if owned_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    ray["owns_temp_dir"] = owned_temp
    record["ray"] = ray
    _write_record(record)
    return record


def down(*, keep_logs: bool = False) -> dict[str, list[int]]:
    """Stop the recorded services (Ray jobs first, then the head, then the server) and forget them.

    Args:
        keep_logs: keep the Ray temp dir that ``up`` created (its logs) instead of deleting it.

    Returns:
        Service name -> PIDs still alive afterwards (all empty on success). The record is removed
        only when nothing is left.
    """
    record = read_record()
    if record is None:
        return {}
    left: dict[str, list[int]] = {}
    ray = record.get("ray")
    if isinstance(ray, dict):
        if ray_healthy(ray):
            stopped = stop_ray_jobs(ray)
            if stopped:
                logger.info("stopped Ray jobs still running: %s", ", ".join(stopped))
        left["ray"] = stop_ray_head(ray)
        if not left["ray"] and ray.get("owns_temp_dir") and not keep_logs:
            shutil.rmtree(ray["temp_dir"], ignore_errors=True)
    if isinstance(record.get("mlflow"), dict) and not record["mlflow"].get("external"):
        left["mlflow"] = stop_mlflow_server(record["mlflow"])
    if not any(left.values()):
        paths.endpoints_file().unlink(missing_ok=True)
    return left


def status(record: dict[str, Any] | None = None) -> list[ServiceState]:
    """Each recorded service: address, main PID, whether it is alive and whether it answers."""
    record = read_record() if record is None else record
    if record is None:
        return []
    states = []
    mlflow = record.get("mlflow")
    if isinstance(mlflow, dict) and mlflow.get("external"):
        healthy = http_get(f"{mlflow['tracking_uri']}/health")[0] == 200
        states.append(
            ServiceState("mlflow", str(mlflow["tracking_uri"]), 0, healthy, healthy, "shared server, not started here")
        )
    elif isinstance(mlflow, dict):
        alive = is_alive(int(mlflow.get("pid", 0)))
        states.append(
            ServiceState(
                name="mlflow",
                address=str(mlflow["tracking_uri"]),
                pid=int(mlflow.get("pid", 0)),
                alive=alive,
                healthy=alive and mlflow_healthy(mlflow),
                detail=f"store {mlflow.get('backend_store_uri')}, artifacts {mlflow.get('artifacts_destination')}",
            )
        )
    ray = record.get("ray")
    if isinstance(ray, dict):
        alive = is_alive(int(ray.get("pid", 0)))
        states.append(
            ServiceState(
                name="ray",
                address=str(ray["address"]),
                pid=int(ray.get("pid", 0)),
                alive=alive,
                healthy=alive and ray_healthy(ray),
                detail=f"dashboard {ray.get('dashboard')}, temp dir {ray.get('temp_dir')}",
            )
        )
    return states
