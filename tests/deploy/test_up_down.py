"""``bratstune up`` / ``status`` / ``down`` for real: a Ray head and an MLflow server on 127.0.0.1.

The commands run as a user runs them (the console script, in a private ``BRATSTUNE_HOME``, any
free ports). ``down`` must leave none of the recorded processes alive; whatever happens, the
finaliser stops every recorded process group by its id (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bratstune import paths
from bratstune.services.processes import group_members, http_get, port_in_use, stop_group
from bratstune.tracking import runs

pytestmark = [pytest.mark.services, pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _bratstune(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "bratstune"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _stop_recorded(record_file: Path) -> None:
    """Safety net: stop every process group the record names, by id."""
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return
    for name in ("ray", "mlflow"):
        service = record.get(name)
        if isinstance(service, dict):
            stop_group(int(service["pgid"]), marker=service["marker"], pids=service.get("pids", []), grace=5)
    if isinstance(record.get("ray"), dict) and record["ray"].get("owns_temp_dir"):
        shutil.rmtree(record["ray"]["temp_dir"], ignore_errors=True)


def test_up_status_down(tmp_path, monkeypatch, procs):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["BRATSTUNE_HOME"] = str(home)
    monkeypatch.setenv("BRATSTUNE_HOME", str(home))
    record_file = paths.endpoints_file()
    try:
        up = _bratstune("up", "--ray-port=0", "--dashboard-port=0", "--mlflow-port=0", "--num-cpus=1", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        record = json.loads(record_file.read_text())
        mlflow, ray = record["mlflow"], record["ray"]

        # both answer, on loopback only
        assert mlflow["tracking_uri"].startswith("http://127.0.0.1:")
        assert ray["address"].startswith("127.0.0.1:") and ray["dashboard"].startswith("http://127.0.0.1:")
        assert http_get(f"{mlflow['tracking_uri']}/health") == (200, "OK")
        status, body = http_get(f"{ray['dashboard']}/api/version")
        assert status == 200 and json.loads(body)["ray_version"]
        assert port_in_use(int(ray["address"].rsplit(":", 1)[1]))  # the GCS
        pids = sorted(set(ray["pids"]) | set(mlflow["pids"]))
        listening = procs.listening_addresses(pids)
        assert listening and all(a.startswith("127.0.0.1:") for a in listening), " ".join(listening)

        # status reports both healthy; jobs and commands started here pick them up
        shown = _bratstune("status", "--json", env=env)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        states = {s["name"]: s for s in json.loads(shown.stdout)["services"]}
        assert states["mlflow"]["healthy"] and states["ray"]["healthy"]
        assert states["ray"]["address"] == ray["address"]
        assert paths.endpoints() == {"MLFLOW_TRACKING_URI": mlflow["tracking_uri"], "RAY_ADDRESS": ray["address"]}
        assert runs.tracking_uri() == mlflow["tracking_uri"]
        assert "healthy" in _bratstune("status", env=env).stdout

        # a second `up` refuses while the first runs
        again = _bratstune("up", "--ray-port=0", "--dashboard-port=0", "--mlflow-port=0", env=env)
        assert again.returncode == 2 and "bratstune down" in again.stderr

        # down stops exactly the recorded processes
        down = _bratstune("down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not [p for p in pids if procs.alive(p)]
        assert not group_members(int(ray["pgid"])) and not group_members(int(mlflow["pgid"]))
        assert not record_file.exists() and not Path(ray["temp_dir"]).exists()
        assert paths.endpoints() == {}
        assert _bratstune("status", env=env).returncode == 1
    finally:
        _stop_recorded(record_file)
