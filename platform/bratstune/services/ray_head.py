"""A local Ray head on 127.0.0.1, started with ``ray start --head`` and stopped by process group.

``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps every Ray process on loopback (without it Ray binds
to the machine's external address), ``RAY_AUTH_MODE=disabled`` keeps ``ray job submit`` working
after a plain ``ray.init()`` once wrote ``~/.ray/auth_token``, and a private ``--temp-dir`` (short:
Ray's socket paths are length-limited) keeps this head apart from any other on the machine; its
path on the command line of the head's processes is how they are recognised when stopped. Every
port Ray would otherwise take by default gets a free one, so a second head never collides.

The head's processes inherit ``MLFLOW_TRACKING_URI`` and ``BRATSTUNE_HOME``, so every job and
trial that runs on it logs to the server ``bratstune up`` started, wherever its working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bratstune.errors import BratstuneError
from bratstune.services.processes import (
    LOOPBACK,
    free_port,
    group_members,
    http_get,
    http_post_json,
    port_in_use,
    start_group,
    stop_group,
    wait_until,
)

__all__ = [
    "RAY_ENV",
    "head_environment",
    "ray_executable",
    "ray_healthy",
    "start_ray_head",
    "stop_ray_head",
    "stop_ray_jobs",
]

#: Environment of the head and of every driver that talks to it (see STACK-NOTES).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
_INTERNAL_PORTS = (
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)
#: Fixed ports that Ray takes from the environment only (44227 and 44217 by default).
_METRIC_PORT_VARIABLES = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")
_FINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (else the one on ``PATH``)."""
    beside = Path(sys.executable).with_name("ray")
    if beside.is_file():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise BratstuneError("the `ray` command is not installed in this environment: run `make venv`")
    return found


def ray_healthy(record: Mapping[str, Any], *, timeout: float = 2.0) -> bool:
    """Whether the head's GCS port accepts connections and its dashboard answers ``/api/version``."""
    port = int(str(record["address"]).rsplit(":", 1)[1])
    if not port_in_use(port):
        return False
    status, body = http_get(f"{record['dashboard']}/api/version", timeout=timeout)
    if status != 200:
        return False
    try:
        return "ray_version" in json.loads(body)
    except ValueError:
        return False


def _job_status(dashboard: str, submission_id: str) -> str:
    status, body = http_get(f"{dashboard}/api/jobs/{submission_id}", timeout=5.0)
    if status != 200:
        return ""
    try:
        return str(json.loads(body).get("status", ""))
    except ValueError:
        return ""


def _accepts_jobs(dashboard: str, *, timeout: float) -> bool:
    """Submit a no-op job until one runs: the head takes jobs a few seconds after ``ray start``."""
    submitted: dict[str, str] = {}

    def submit() -> bool:
        status, body = http_post_json(
            f"{dashboard}/api/jobs/", {"entrypoint": "true", "metadata": {"bratstune": "up: readiness check"}}
        )
        if status == 200 and isinstance(body, dict) and body.get("submission_id"):
            submitted["id"] = str(body["submission_id"])
            return True
        return False

    started = time.monotonic()
    if not wait_until(submit, timeout=timeout, interval=1.0):
        return False
    left = max(5.0, timeout - (time.monotonic() - started))
    return wait_until(lambda: _job_status(dashboard, submitted["id"]) in _FINAL_JOB_STATES, timeout=left, interval=0.5)


def start_ray_head(
    *,
    port: int,
    dashboard_port: int,
    temp_dir: Path,
    log: Path,
    env: Mapping[str, str],
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """``ray start --head`` in its own process group; returns once the head accepts jobs.

    Args:
        port: GCS port on 127.0.0.1 (``RAY_ADDRESS``).
        dashboard_port: dashboard and job API port.
        temp_dir: private Ray temp dir (keep the path short).
        log: file that receives ``ray start``'s output.
        env: environment of the head (``RAY_ENV`` is added).
        num_cpus: CPUs the head offers (default: Ray detects them).
        num_gpus: GPUs the head offers (default: Ray detects them).
        timeout: seconds for ``ray start`` and for the readiness check each.

    Returns:
        Its record for ``endpoints.json``: ``address``, ``dashboard``, ``client``, ``pid`` (the GCS
        server), ``pgid``, ``pids``, ``marker`` (the temp dir), ``temp_dir``, ``log``, ``ports``.

    Raises:
        BratstuneError: ``ray start`` failed or the head did not come up in time.
    """
    temp_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in _INTERNAL_PORTS}
    command = [
        ray_executable(), "start", "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"--{name}={value}" for name, value in ports.items()),
    ]  # fmt: skip
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    started = time.monotonic()
    metric_ports = {name: str(free_port()) for name in _METRIC_PORT_VARIABLES}
    process = start_group(command, log=log, env={**env, **metric_ports, **RAY_ENV})
    record: dict[str, Any] = {
        "address": f"{LOOPBACK}:{port}",
        "dashboard": f"http://{LOOPBACK}:{dashboard_port}",
        "client": f"ray://{LOOPBACK}:{ports['ray-client-server-port']}",
        "pid": 0,
        "pgid": process.pid,
        "pids": [],
        "marker": str(temp_dir),
        "temp_dir": str(temp_dir),
        "log": str(log),
        "ports": {**ports, **{name.lower(): int(port) for name, port in metric_ports.items()}},
    }
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    if code != 0:
        stop_ray_head(record)
        raise BratstuneError(f"`ray start --head` failed (status {code}); see {log}")
    members = group_members(process.pid)
    record["pids"] = sorted(members)
    record["pid"] = next((pid for pid, args in members.items() if "gcs_server" in args), 0)
    if not record["pid"] or not _accepts_jobs(record["dashboard"], timeout=timeout):
        stop_ray_head(record)
        raise BratstuneError(f"the Ray head on {record['address']} did not come up in {timeout:.0f} s; see {temp_dir}")
    record["pids"] = sorted(set(record["pids"]) | set(group_members(process.pid)))
    record["started_s"] = round(time.monotonic() - started, 1)
    return record


def stop_ray_jobs(record: Mapping[str, Any]) -> list[str]:
    """Stop the jobs still running on the head (their drivers run in sessions of their own)."""
    status, body = http_get(f"{record['dashboard']}/api/jobs/", timeout=5.0)
    if status != 200:
        return []
    try:
        jobs = json.loads(body)
    except ValueError:
        return []
    stopped = []
    for job in jobs if isinstance(jobs, list) else []:
        submission_id = job.get("submission_id")
        if submission_id and job.get("status") not in _FINAL_JOB_STATES:
            http_post_json(f"{record['dashboard']}/api/jobs/{submission_id}/stop", {})
            stopped.append(str(submission_id))
    if stopped:
        wait_until(
            lambda: all(_job_status(str(record["dashboard"]), s) in _FINAL_JOB_STATES for s in stopped), timeout=30.0
        )
    return stopped


def stop_ray_head(record: Mapping[str, Any]) -> list[int]:
    """Stop the head's process group (SIGTERM, then SIGKILL: ``gcs_server`` may need it); PIDs left alive."""
    pids = [int(p) for p in record.get("pids", [])]
    return stop_group(int(record["pgid"]), marker=str(record["marker"]), pids=pids, grace=5.0)


def head_environment(tracking_uri: str, home: Path) -> dict[str, str]:
    """The head's environment: this one, plus the tracking server and home every trial must use.

    This interpreter's folder goes first on ``PATH``, so ``python`` in a submitted job's entrypoint
    (``ray job submit -- python jobs/x.py``) is this environment's, activated or not.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return {**env, "MLFLOW_TRACKING_URI": tracking_uri, "BRATSTUNE_HOME": str(home), **RAY_ENV}
