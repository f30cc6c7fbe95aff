"""Shared by the cluster tests: helpers loaded by path, a Ray driver's environment, ``bratstune up`` and its jobs.

tests/ is not a package (``--import-mode=importlib``), so helpers that Ray must ship to its
workers are loaded from their files and registered for pickling by value.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bratstune.services.processes import stop_group

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: Environment of every Ray process and driver these tests start (see STACK-NOTES): loopback
#: only, and no token auth (a plain ``ray.init()`` elsewhere may have written ~/.ray/auth_token).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def load_helper(name: str) -> ModuleType:
    """``tests/cluster/<name>.py`` as a module, pickled by value when Ray ships it to workers."""
    module_name = f"bratstune_cluster_test_{name.lstrip('_')}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    # Deferred: only tests that ship helpers to Ray workers pay for importing Ray.
    from ray import cloudpickle  # noqa: PLC0415  (Ray's vendored copy pickles the trainables)

    cloudpickle.register_pickle_by_value(module)
    return module


@pytest.fixture()
def ray_env(monkeypatch) -> dict[str, str]:
    """This process as a Ray driver on loopback without token auth."""
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    return dict(RAY_ENV)


@pytest.fixture(scope="session")
def cluster_helper():
    """:func:`load_helper`: ``cluster_helper("_placement")`` is ``tests/cluster/_placement.py``."""
    return load_helper


# -- `bratstune up` in a private home, and every job submitted to it -----------------------------

#: Each job as ``ray job submit ... -- python jobs/<job>.py --smoke-test`` runs it.
JOBS = (
    "search_losses",
    "search_thresholds",
    "cross_validate",
    "pretrain_mae",
    "finetune_transfer",
    "transfer_study",
    "batch_predict",
)
ARTIFACTS = ROOT / "test-artifacts"


def _bratstune(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "bratstune"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """``bratstune up`` (Ray head of 4 logical CPUs + MLflow server on 127.0.0.1) in a private home.

    Yields ``{"home", "env", "record"}``; ``bratstune down`` afterwards, and whatever is still
    recorded is stopped by process group id.
    """
    home = tmp_path_factory.mktemp("stack-home")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_ENV, BRATSTUNE_HOME=str(home), BRATSTUNE_CACHE=str(home / "cache"))
    record_file = home / "endpoints.json"
    try:
        up = _bratstune("up", "--ray-port=0", "--dashboard-port=0", "--mlflow-port=0", "--num-cpus=4", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"home": home, "env": env, "record": json.loads(record_file.read_text())}
    finally:
        down = _bratstune("down", env=env)
        if down.returncode != 0 or record_file.exists():  # safety net: stop every recorded group by id
            record = json.loads(record_file.read_text()) if record_file.exists() else {}
            for name in ("ray", "mlflow"):
                service = record.get(name)
                if isinstance(service, dict) and service.get("pgid"):
                    stop_group(int(service["pgid"]), marker=service["marker"], pids=service.get("pids", []), grace=5)


@dataclass
class SubmittedJob:
    """One job submitted to the stack's head, once it ended (or the wait gave up)."""

    job: str
    submission_id: str
    status: str
    seconds: float
    logs: str


def _submit_with_cli(dashboard: str, job: str, env: dict[str, str]) -> str:
    """``ray job submit --no-wait --working-dir . -- python jobs/<job>.py --smoke-test``; the submission id."""
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--no-wait",
        "--address", dashboard, "--working-dir", ".",
        "--", "python", f"jobs/{job}.py", "--smoke-test",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"raysubmit_\w+", done.stdout + done.stderr).group(0)


@pytest.fixture(scope="session")
def submitted_jobs(stack) -> dict[str, SubmittedJob]:
    """Every job of :data:`JOBS` submitted at once to the stack's head, with ``--smoke-test``.

    The first goes through the ``ray job submit`` CLI, the others through the Python
    ``JobSubmissionClient`` (the same REST call, without 3 s of CLI start-up each), all with the
    repository as working dir. The head's processes carry the stack's ``MLFLOW_TRACKING_URI`` and
    ``BRATSTUNE_HOME``, so the jobs get no environment of their own.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard = stack["record"]["ray"]["dashboard"]
    client = JobSubmissionClient(dashboard)
    ids = {JOBS[0]: _submit_with_cli(dashboard, JOBS[0], stack["env"])}
    for job in JOBS[1:]:
        ids[job] = client.submit_job(
            entrypoint=f"python jobs/{job}.py --smoke-test",
            runtime_env={"working_dir": str(ROOT)},
            metadata={"test": "tests/cluster"},
        )
    final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    deadline = time.monotonic() + JOBS_TIMEOUT_S
    while time.monotonic() < deadline and not all(client.get_job_status(i) in final for i in ids.values()):
        time.sleep(2)
    out = {}
    ARTIFACTS.mkdir(exist_ok=True)
    for job, submission_id in ids.items():
        info = client.get_job_info(submission_id)
        if info.status not in final:
            client.stop_job(submission_id)
        seconds = ((info.end_time or time.time() * 1000) - info.start_time) / 1000
        logs = client.get_job_logs(submission_id)
        (ARTIFACTS / f"job-{job}.log").write_text(logs)
        out[job] = SubmittedJob(job, submission_id, str(info.status), round(seconds, 1), logs)
    return out


#: How long the jobs may take together (they run at once on 2 cores).
JOBS_TIMEOUT_S = 900
