"""Every job under ``ray job submit --working-dir .`` against ``bratstune up``, each with ``--smoke-test``.

The jobs (search, thresholds, cross-validation, MAE pre-training, fine-tuning, transfer study,
batch prediction) are submitted at once to the head ``bratstune up`` started (private
``BRATSTUNE_HOME``); each must SUCCEED and leave its result on the MLflow server ``up`` started:
runs FINISHED with what the job logs, a registered encoder, predictions on disk. Each job's log
is kept under ``test-artifacts/``.
"""

from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.services, pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow, pytest.mark.stack]


def _run_id(pattern: str, logs: str) -> str:
    found = re.search(pattern, logs)
    assert found, f"no match for {pattern!r} in the job's log:\n{logs[-3000:]}"
    return found.group(1)


def _last_json(logs: str) -> dict:
    for line in reversed(logs.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary in the job's log:\n{logs[-3000:]}")


def _children(client: MlflowClient, run) -> list:
    return client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=100
    )


def test_every_job_succeeds_under_ray_job_submit(stack, submitted_jobs):
    timings = {job: (s.status, s.seconds) for job, s in submitted_jobs.items()}
    print("jobs (status, seconds from start to end):", timings)
    failed = {job: s.logs[-2500:] for job, s in submitted_jobs.items() if s.status != "SUCCEEDED"}
    assert not failed, "\n\n".join(f"== {job} ==\n{tail}" for job, tail in failed.items())

    uri = stack["record"]["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)
    logs = {job: s.logs for job, s in submitted_jobs.items()}
    served = "mlflow-artifacts:/"  # artifacts went through the server, not to a path of the job's own

    # search: a parent run with finished child trials; the link printed opens the runs table
    link = _run_id(r"compare the trials: (\S+)", logs["search_losses"])
    assert link.startswith(f"{uri}/#/experiments/") and link.endswith("?workflowType=machine_learning")
    best = client.get_run(_run_id(r"\(MLflow run ([0-9a-f]{32})\)", logs["search_losses"]))
    parent = client.get_run(best.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith(served)
    trials = _children(client, parent)
    assert len(trials) >= 2 and all(t.info.status == "FINISHED" for t in trials)
    # ... the parent carries the objective and the best trial; each run names its cohort (Dataset column)
    metric, mode = parent.data.params["metric"], parent.data.params["mode"]
    assert parent.data.tags["search.objective"] == f"{mode} {metric}"
    assert parent.data.tags["best_trial_id"] and f"best/{metric}" in parent.data.metrics
    assert "**Best trial**" in parent.data.tags["mlflow.note.content"]
    fingerprint = parent.data.tags["data.fingerprint"]
    for run in [parent, *trials]:
        (cohort,) = run.inputs.dataset_inputs
        assert cohort.dataset.digest == fingerprint and json.loads(cohort.dataset.profile)["num_cases"] == 8
    assert all(f"best/{metric}" in t.data.metrics and t.data.tags["ray.node_id"] for t in trials)

    # thresholds: one finished run holding the best decode
    run = client.get_run(_run_id(r"MLflow run ([0-9a-f]{32}); compare", logs["search_thresholds"]))
    assert run.info.status == "FINISHED"
    assert "best_postprocess.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # cross-validation: a parent run and one finished run per fold
    cv = client.get_run(_run_id(r"MLflow parent run ([0-9a-f]{32})", logs["cross_validate"]))
    assert cv.info.status == "FINISHED"
    folds = [r for r in _children(client, cv) if r.data.tags.get("ray_trial_id")]
    assert len(folds) >= 2 and all(f.info.status == "FINISHED" for f in folds)
    assert all(len(f.inputs.dataset_inputs) == 1 for f in folds)  # each fold names the cohort it trained on

    # pre-training: a finished run and the encoder registered on the server
    summary = _last_json(logs["pretrain_mae"])
    assert client.get_run(summary["run_id"]).info.status == "FINISHED" and summary["epochs"] >= 1
    assert summary["model_uri"] and client.get_model_version("bratstune-mae-encoder", str(summary["model_version"]))

    # fine-tuning (one run, in the driver): the transferred model and its validation metrics
    tuned = _last_json_block(logs["finetune_transfer"])
    assert tuned["best_dir"] and tuned["transfer"] and any(k.startswith("val/") for k in tuned["metrics"])

    # transfer study: a parent run with the study table, one child per variant
    study = client.get_run(_run_id(r"MLflow parent run ([0-9a-f]{32})", logs["transfer_study"]))
    assert study.info.status == "FINISHED" and study.data.tags.get("winner")
    assert "transfer_table.md" in {a.path for a in client.list_artifacts(study.info.run_id)}
    assert len(_children(client, study)) == 6

    # batch prediction: every case predicted, recorded in a finished run
    batch = client.get_run(_run_id(r"MLflow run ([0-9a-f]{32})", logs["batch_predict"]))
    assert batch.info.status == "FINISHED"
    out = stack["home"] / "results" / "smoke-predict" / "out"
    assert (out / "predictions.csv").is_file() and len(list(out.glob("*-seg.nii.gz"))) == 3
    assert "3 predicted, 0 already done, 0 failed" in logs["batch_predict"]

    # every experiment the jobs created opens on the training-runs table
    for experiment in client.search_experiments():
        if experiment.name != "Default":
            assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development", experiment.name


def _last_json_block(logs: str) -> dict:
    """The last indented JSON object printed (``json.dumps(..., indent=2)``)."""
    start = logs.rfind("\n{\n")
    end = logs.find("\n}", start)
    assert start >= 0 and end > start, logs[-3000:]
    return json.loads(logs[start + 1 : end + 2])
