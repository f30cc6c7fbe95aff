"""jobs/_bootstrap: one Ray/MLflow session for every job, and one error tail."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[2] / "jobs"


@pytest.fixture()
def bootstrap(monkeypatch):
    monkeypatch.syspath_prepend(str(JOBS))
    import _bootstrap

    return _bootstrap


@pytest.fixture()
def ray_calls(monkeypatch):
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return calls


def test_resource_options_only_when_starting_a_local_ray(bootstrap, ray_calls, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with bootstrap.session(num_cpus=3, _temp_dir=None) as session:
        assert session.address is None and session.experiment_id is None
    local = ray_calls[-1]
    assert local["address"] is None and local["num_cpus"] == 3 and "_temp_dir" not in local
    assert local["runtime_env"] == bootstrap.runtime_env()

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as under `ray job submit`: Ray refuses num_cpus
    with bootstrap.session(num_cpus=3) as session:
        assert session.address == "127.0.0.1:6379"
    joined = ray_calls[-1]
    assert joined == {"address": "127.0.0.1:6379", "runtime_env": bootstrap.runtime_env()}

    with bootstrap.session(address="10.0.0.1:6379", num_cpus=3):  # --address wins over $RAY_ADDRESS
        pass
    assert ray_calls[-1]["address"] == "10.0.0.1:6379" and "num_cpus" not in ray_calls[-1]


@pytest.mark.mlflow
def test_mlflow_only_session_sets_up_the_experiment(bootstrap, ray_calls, monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with bootstrap.session(experiment="jobs", ray=False) as session:
        assert session.experiment_id and session.tracking_uri == uri and session.address is None
    assert ray_calls == []


def test_error_tail_is_one_line_on_stderr_and_exit_code_2(bootstrap, capsys, monkeypatch):
    from bratstune.errors import ConfigError

    monkeypatch.setattr(sys, "argv", ["jobs/some_job.py"])

    @bootstrap.error_tail
    def main(argv=None) -> int:
        raise ConfigError("--data: no such folder\n  give the cohort folder")

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == "some_job.py: error: --data: no such folder give the cohort folder\n"

    @bootstrap.error_tail
    def crash(argv=None) -> int:
        raise RuntimeError("a bug, not a user error")

    with pytest.raises(RuntimeError):  # only BratstuneError is a user error; bugs keep their traceback
        crash([])
