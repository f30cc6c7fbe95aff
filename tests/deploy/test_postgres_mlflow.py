"""A real PostgreSQL behind a real ``mlflow server``: nested runs, params, metrics and artifacts.

PostgreSQL is Debian's ``postgresql`` package (``make test`` installs it, see the Makefile's
``system-packages``): ``initdb`` with a password (scram-sha-256), ``pg_ctl start`` on a free port on
127.0.0.1, both as the ``postgres`` user when the tests run as root (``initdb`` refuses root). Its
data folder is a fresh ``/tmp/btpg-*``, not ``tmp_path``: pytest's base folder is private to the
user running the tests, so the ``postgres`` user could not enter it. The module stops the cluster
with ``pg_ctl stop`` and then checks its postmaster PID is gone (SIGKILL by that PID if not).

Each server is started in its own process group and stopped by that group's id. The last test
runs the real smoke search (``jobs/search_losses.py --smoke-test``) against the server.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from bratstune.services.processes import group_members, http_get, start_group, stop_group, wait_until
from bratstune.tracking.runs import setup_mlflow, start_run

pytestmark = [pytest.mark.services, pytest.mark.mlflow, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVE = ROOT / "deploy" / "mlflow" / "serve.sh"
USER = "mlflow"


def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: Debian keeps them off PATH, in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the ``postgres`` user when we are root (initdb and the server refuse root)."""
    if os.geteuid() != 0:
        return command
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]


def _run(command: list[str], **kwargs) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, **kwargs)
    assert done.returncode == 0, f"{shlex.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def postgres(procs):
    """A private PostgreSQL cluster on 127.0.0.1; ``createdb(name)`` makes a database in it."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed: `make system-packages` (as root) installs Debian's postgresql")
    folder = Path(tempfile.mkdtemp(prefix="btpg-", dir="/tmp"))  # short: the socket path is length-limited
    data, password, port = folder / "data", secrets.token_urlsafe(16), procs.free_port()
    (folder / "pw").write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(folder / "pw", "postgres", "postgres")
    folder.chmod(0o700)
    _run(_as_postgres([initdb, "-D", str(data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}"]))
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    _run(_as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]))
    pid = int((data / "postmaster.pid").read_text().split()[0])
    env = dict(os.environ, PGPASSWORD=password)
    createdb = str(Path(pg_ctl).with_name("createdb"))

    def create(name: str) -> str:
        _run([createdb, "-h", "127.0.0.1", "-p", str(port), "-U", USER, name], env=env)
        return f"postgresql://{USER}@127.0.0.1:{port}/{name}"

    try:
        yield {"createdb": create, "password": password, "port": port, "pid": pid}
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True, timeout=60
        )
        if not wait_until(lambda: not procs.alive(pid), timeout=20):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not procs.alive(pid), timeout=10)
        assert not procs.alive(pid), f"postmaster {pid} survived"
        shutil.rmtree(folder, ignore_errors=True)


def _rows(postgres, database: str, sql: str) -> list[tuple]:
    import psycopg

    dsn = f"host=127.0.0.1 port={postgres['port']} user={USER} dbname={database} password={postgres['password']}"
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


def _start_server(command: list[str], env: dict[str, str], port: int, log: Path):
    process = start_group(command, log=log, env=env)
    uri = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: process.poll() is not None or http_get(f"{uri}/health") == (200, "OK"), timeout=90):
        stop_group(process.pid, marker=f"{port}", pids=[process.pid])
        pytest.fail(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
    assert process.poll() is None, log.read_text()[-3000:]
    return process, uri


def _stop_server(process, port: int, procs) -> None:
    pids = list(group_members(process.pid))
    left = stop_group(process.pid, marker=f"{port}", pids=pids)
    process.wait(timeout=10)
    assert not left and not [p for p in pids if procs.alive(p)], f"server processes left: {left}"


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, procs, tmp_path_factory):
    """``mlflow server --backend-store-uri postgresql://...`` with artifacts proxied to a folder."""
    folder = tmp_path_factory.mktemp("mlflow-pg")
    store, port = postgres["createdb"]("mlflow"), procs.free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
        "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = dict(os.environ, PGPASSWORD=postgres["password"], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    process, uri = _start_server(command, env, port, folder / "server.log")
    try:
        yield {"uri": uri, "database": "mlflow", "artifacts": folder / "artifacts"}
    finally:
        mlflow.set_tracking_uri(None)
        _stop_server(process, port, procs)


def test_parent_and_child_runs_round_trip_through_postgres(mlflow_on_postgres, postgres):
    uri = mlflow_on_postgres["uri"]
    experiment_id = setup_mlflow("bratstune-postgres", uri=uri)
    logged = {}
    with start_run(run_name="search", experiment_id=experiment_id, tags={"bratstune.kind": "search"}) as parent:
        mlflow.log_param("space", "losses")
        for i, lr in enumerate((1e-3, 3e-4)):
            with start_run(
                run_name=f"trial-{i}", experiment_id=experiment_id, parent_run_id=parent.info.run_id, nested=True
            ) as child:
                mlflow.log_params({"optim.lr": lr, "loss.terms": "dice+ce"})
                for step, value in enumerate((0.2 + i / 10, 0.5 + i / 10)):
                    mlflow.log_metric("val/dice_lesion_mean", value, step=step)
                mlflow.log_text(f"trial {i}\n", "notes/trial.txt")
                logged[child.info.run_id] = (lr, 0.5 + i / 10)

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id])
    assert len(runs) == 3
    parent_run = next(r for r in runs if r.info.run_id == parent.info.run_id)
    assert "mlflow.parentRunId" not in parent_run.data.tags
    assert parent_run.data.params == {"space": "losses"} and parent_run.info.status == "FINISHED"
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert {r.info.run_id for r in children} == set(logged)
    for child in children:
        lr, last = logged[child.info.run_id]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.params["optim.lr"] == str(lr) and child.data.params["loss.terms"] == "dice+ce"
        assert child.data.metrics["val/dice_lesion_mean"] == pytest.approx(last)
        history = client.get_metric_history(child.info.run_id, "val/dice_lesion_mean")
        assert [m.step for m in history] == [0, 1]
        assert child.info.status == "FINISHED"
        assert Path(client.download_artifacts(child.info.run_id, "notes/trial.txt")).read_text().startswith("trial ")
    # it really is PostgreSQL that holds them, and the server's folder that holds the artifacts
    assert _rows(postgres, "mlflow", "SELECT count(*) FROM runs")[0][0] == 3
    assert len(list(mlflow_on_postgres["artifacts"].rglob("trial.txt"))) == 2


def test_deployed_server_script_with_basic_auth(postgres, procs, tmp_path, monkeypatch):
    """``deploy/mlflow/serve.sh`` (the image's entrypoint) as deployed: credentials from the environment."""
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF) in this venv")
    store = postgres["createdb"]("mlflow_deployed")
    postgres["createdb"]("mlflow_auth")
    port, admin = procs.free_port(), secrets.token_urlsafe(12)
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        MLFLOW_PYTHON=sys.executable,
        MLFLOW_BACKEND_STORE_URI=store,
        PGPASSWORD=postgres["password"],
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
        MLFLOW_AUTH_ADMIN_USERNAME="admin",
        MLFLOW_AUTH_ADMIN_PASSWORD=admin,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    process, uri = _start_server(["sh", str(SERVE)], env, port, tmp_path / "server.log")
    try:
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_get(search)[0] == 401  # anonymous clients are refused
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin)
        experiment_id = setup_mlflow("bratstune-auth", uri=uri)
        with start_run(run_name="authenticated", experiment_id=experiment_id) as run:
            mlflow.log_metric("m", 1.0)
        assert MlflowClient(uri).get_run(run.info.run_id).data.metrics == {"m": 1.0}
        users = _rows(postgres, "mlflow_auth", "SELECT username FROM users")
        assert ("admin",) in users  # users live in their own database
        request = urllib.request.Request(search, headers={"Authorization": "Basic invalid"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)
    finally:
        mlflow.set_tracking_uri(None)
        _stop_server(process, port, procs)


def _kill_processes_naming(text: str) -> None:
    for _ in range(3):
        pids = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline") if text in _read(p)]
        for pid in pids:
            if pid != os.getpid():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.ray
def test_smoke_search_logs_through_postgres_server(mlflow_on_postgres, postgres, tmp_path):
    """``jobs/search_losses.py --smoke-test`` with ``MLFLOW_TRACKING_URI`` at the PostgreSQL-backed server."""
    uri = mlflow_on_postgres["uri"]
    ray_tmp = tempfile.mkdtemp(prefix="btrs-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        BRATSTUNE_HOME=str(tmp_path / "home"),
        MLFLOW_TRACKING_URI=uri,
        RAY_TMPDIR=ray_tmp,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
    )
    command = [sys.executable, "jobs/search_losses.py", "--smoke-test", "--num-cpus", "2", "--experiment", "pg-smoke"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    finally:
        _kill_processes_naming(ray_tmp)  # the driver's local Ray, if it outlived the driver
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pg-smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.data.tags.get("mlflow.runName") for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert children and len(children) == len(runs) - 1
    for child in children:
        assert child.data.params, child.info.run_name
        assert any(k.startswith("val/") for k in child.data.metrics), json.dumps(child.data.metrics)
    held = _rows(postgres, "mlflow", f"SELECT count(*) FROM runs WHERE experiment_id = {int(experiment.experiment_id)}")
    assert held[0][0] == len(runs)
