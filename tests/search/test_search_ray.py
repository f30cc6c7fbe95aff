"""End-to-end searches on a real local Ray head (127.0.0.1), shared by the tests of this module.

* a job submitted with ``ray job submit --working-dir .`` succeeds and leaves one MLflow parent run
  with child runs carrying params and metrics;
* a trial that raises is retried, ends in error, is recorded, and the search still completes;
* a driver killed mid-search is resumed with ``--resume``: finished trials are kept, not re-run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow]

#: Same auth mode for head and clients: a plain ``ray.init()`` elsewhere on the machine writes
#: ~/.ray/auth_token, after which ``ray start`` enables token auth unless told otherwise. Set
#: before this process first talks to Ray (the mode is fixed at the first connection).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
os.environ.update(RAY_ENV)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_processes_under(temp_dir: str) -> None:
    """Stop the head we started: every process whose command line names its private temp dir."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
        pids = _pids_naming(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and _pids_naming(temp_dir):
            time.sleep(0.2)


def _wait_for_job_agent(dashboard: str, timeout: float = 90.0) -> None:
    """The head accepts jobs a few seconds after ``ray start`` returns: submit a no-op until it runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.time() + timeout
    client = JobSubmissionClient(dashboard)
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(1.0)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            raise TimeoutError("the no-op job did not finish")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with a private temp dir; stopped by PID afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    port, dash = _free_port(), _free_port()
    env = dict(os.environ, **RAY_ENV)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        # every fixed default port gets a free one, so parallel clusters on the machine never collide
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        _wait_for_job_agent(f"http://127.0.0.1:{dash}")
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp_dir": temp_dir}
    finally:
        _kill_processes_under(temp_dir)


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = []
    for exp in client.search_experiments():
        runs.extend(client.search_runs([exp.experiment_id], max_results=1000))
    parents = [
        r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("bratstune.kind") == "search"
    ]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_submitted_smoke_job_records_parent_and_child_runs(ray_head, tmp_path):
    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env_vars = {"BRATSTUNE_HOME": str(home), "MLFLOW_TRACKING_URI": uri, **RAY_ENV}
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_head["dashboard"],
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        sys.executable,
        "jobs/search_losses.py",
        "--smoke-test",
    ]
    env = dict(os.environ, **RAY_ENV)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_id = re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)
    assert JobSubmissionClient(ray_head["dashboard"]).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "mlflow ui --backend-store-uri" in done.stdout

    client, parents, children = _runs(uri)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["seed"] == "0" and parent.data.tags.get("data.fingerprint")
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert len(mine) >= 2
    for child in mine:
        assert "loss.weights.dice" in child.data.params
        assert "val/dice_mean" in child.data.metrics and "train/loss" in child.data.metrics
        assert child.data.tags.get("stop_reason")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "best_config.yaml", "plots", "space"} <= artifacts
    assert any(a.path.startswith("best_model") for a in client.list_artifacts(mine[0].info.run_id))


@pytest.fixture()
def driver(ray_head, monkeypatch):
    import ray

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    ray.init(address=ray_head["address"], include_dashboard=False)
    try:
        yield ray_head
    finally:
        ray.shutdown()


def test_a_failing_trial_is_recorded_and_the_search_completes(driver, tmp_path):
    import importlib.util

    from ray import cloudpickle  # Ray's vendored copy is the one that pickles trainables

    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking

    spec_ = importlib.util.spec_from_file_location("bratstune_test_faults", Path(__file__).with_name("_faults.py"))
    _faults = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = _faults
    spec_.loader.exec_module(_faults)
    cloudpickle.register_pickle_by_value(_faults)  # tests/ is not importable on the workers
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("failures", uri=uri)
    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml").smoke_variant()
    spec = spec.with_changes(num_samples=3, failure=type(spec.failure)(max_failures=1))
    cohort = synthetic_cohort(cases=6, shape=(48, 48, 32), root=tmp_path / "data")
    data = prepare_data(spec, cohort, cache_root=tmp_path / "cache")
    outcome = run_search(
        spec,
        data,
        storage_path=tmp_path / "results",
        name="failing",
        tracking_uri=uri,
        experiment_id=experiment_id,
        fit_fn=functools.partial(_faults.fail_one_trial, marker=str(tmp_path / "failed-trial")),
        verbose=0,
    )
    failed_id = (tmp_path / "failed-trial").read_text().strip()
    rows = {r["trial_id"]: r for r in outcome.table}
    assert len(rows) == 3
    assert rows[failed_id]["status"] == "ERROR" and "injected failure" in rows[failed_id]["error"]
    assert outcome.errors >= 1 and outcome.best_config is not None
    client, parents, children = _runs(uri)
    failed_run = client.get_run(rows[failed_id]["mlflow_run_id"])
    assert failed_run.info.status == "FAILED"
    assert "InjectedFailure" in failed_run.data.tags["stop_reason"] or "injected" in failed_run.data.tags["stop_reason"]
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert "failed-trial" not in "".join(r.get("error", "") for k, r in rows.items() if k != failed_id)


def test_killed_search_resumes_and_keeps_finished_trials(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    home, storage = tmp_path / "home", tmp_path / "results"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = dict(os.environ, BRATSTUNE_HOME=str(home), MLFLOW_TRACKING_URI=uri, TUNE_GLOBAL_CHECKPOINT_S="1", **RAY_ENV)
    args = [
        sys.executable,
        "jobs/search_losses.py",
        "--smoke-test",
        "--num-samples",
        "4",
        "--address",
        ray_head["address"],
        "--name",
        "resumable",
        "--storage-path",
        str(storage),
    ]
    from bratstune.tracking import runs as tracking

    tracking.setup_mlflow("bratstune-search", uri=uri)  # schema once, before two processes open the store
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished: list = []
    deadline = time.time() + 300
    try:
        while time.time() < deadline and first.poll() is None:
            time.sleep(2)
            if not (home / "mlflow.db").is_file():
                continue
            try:
                _, parents, children = _runs(uri)
            except Exception:  # database still being created
                continue
            finished = [c for c in children if c.info.status == "FINISHED"]
            if finished:
                time.sleep(3)  # let Tune snapshot the experiment state (TUNE_GLOBAL_CHECKPOINT_S=1)
                break
        assert first.poll() is None, (
            "the search ended before it could be interrupted:\n" + (tmp_path / "first.log").read_text()[-3000:]
        )
        assert finished, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the driver (and its session), as a crash would
        first.wait(timeout=30)
        log.close()
    client = MlflowClient(uri)
    finished_before = {
        c.data.tags["ray_trial_id"]: c.info.run_id for c in (client.get_run(f.info.run_id) for f in finished)
    }

    second = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    table = list(__import__("csv").DictReader(open(storage / "resumable" / "results.csv")))
    ids = {row["trial_id"]: row for row in table}
    assert set(finished_before) <= set(ids), (finished_before, ids.keys())
    assert len(table) >= 4
    for trial_id, run_id in finished_before.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags.get("resumed") != "true"  # not re-run
        assert ids[trial_id]["mlflow_run_id"] == run_id
    _, parents, children = _runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags.get("resumed") == "true"
    assert all(c.info.status in ("FINISHED", "FAILED", "KILLED") for c in children)


def test_a_multi_objective_search_writes_its_pareto_front(driver, tmp_path):
    """``metric: [dice_lesion, hd95_lesion]``: Optuna's multi-objective TPE, FIFO, a Pareto front."""
    import csv
    import io

    from mlflow.tracking import MlflowClient

    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space, parse_spec
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking

    raw = dict(load_search_space(ROOT / "search_spaces" / "losses.yaml").raw)
    raw.update(metric=["val/dice_lesion_mean", "val/hd95_lesion_mean"], mode=["max", "min"])
    raw.pop("scheduler")  # a multi-objective search defaults to FIFO
    spec = parse_spec(raw, source=ROOT / "search_spaces" / "losses.yaml").smoke_variant()
    spec = spec.with_changes(num_samples=3)
    assert spec.multi_objective and spec.scheduler.type == "fifo"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("pareto", uri=uri)
    cohort = synthetic_cohort(cases=6, shape=(48, 48, 32), root=tmp_path / "data")
    data = prepare_data(spec, cohort, cache_root=tmp_path / "cache")
    outcome = run_search(
        spec, data, storage_path=tmp_path / "results", name="pareto", tracking_uri=uri, experiment_id=experiment_id
    )
    client = MlflowClient(uri)
    parent = outcome.parent_run_id
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert "pareto_front.csv" in artifacts
    assert "plots/pareto_front.png" in {a.path for a in client.list_artifacts(parent, "plots")}
    local = Path(client.download_artifacts(parent, "pareto_front.csv", str(tmp_path)))
    front = list(csv.DictReader(io.StringIO(local.read_text())))
    assert 1 <= len(front) <= 3
    scored = [r for r in outcome.table if r["best val/dice_lesion_mean"] is not None]
    points = {
        r["trial_id"]: (float(r["last val/dice_lesion_mean"]), float(r["last val/hd95_lesion_mean"])) for r in scored
    }
    for row in front:  # no trial dominates a front member: at least as good on both, better on one
        d, h = points[row["trial_id"]]
        assert not any(d2 >= d and h2 <= h and (d2 > d or h2 < h) for d2, h2 in points.values())
    assert client.get_run(parent).data.metrics["search/pareto_trials"] == len(front)
