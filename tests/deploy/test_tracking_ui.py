"""What the MLflow UI needs from the platform's runs, on a real (SQLite) store.

* every experiment ``setup_mlflow`` creates or reuses is tagged as model training
  (``mlflow.experimentKind``), and the links printed open the training-runs table
  (``?workflowType=machine_learning``; a fresh browser opens MLflow 3's GenAI view otherwise);
* ``log_cohort_input`` records the cohort as a dataset input (the runs table's Dataset column),
  as ``bratstune train`` does.
"""

from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from bratstune.tracking import runs


def test_experiments_are_tagged_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    new = runs.setup_mlflow("fresh", uri=uri)
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("from-before", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert runs.setup_mlflow("from-before", uri=uri) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_links_open_the_runs_table():
    served = runs.experiment_link("http://127.0.0.1:5123/", "7")
    assert served == "http://127.0.0.1:5123/#/experiments/7?workflowType=machine_learning"
    local = runs.experiment_link("sqlite:////data/mlflow.db", "7")
    assert local.startswith("mlflow ui --backend-store-uri sqlite:////data/mlflow.db")
    assert local.endswith("http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning")


def test_the_cohort_is_a_dataset_input(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(runs.setup_mlflow("inputs", uri=uri)).info.run_id
    runs.log_cohort_input(
        run_id,
        name="BraTS-GLI",
        fingerprint="0123456789abcdef",
        root=tmp_path / "BraTS-GLI",
        cases=10,
        profile={"train_cases": 8, "val_cases": 2},
        client=client,
    )
    (entry,) = client.get_run(run_id).inputs.dataset_inputs
    assert entry.dataset.name == "BraTS-GLI" and entry.dataset.digest == "0123456789abcdef"
    assert json.loads(entry.dataset.profile) == {"num_cases": 10, "train_cases": 8, "val_cases": 2}
    assert json.loads(entry.dataset.source) == {"uri": str(tmp_path / "BraTS-GLI")}
    assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": "training"}


@pytest.mark.slow
@pytest.mark.mlflow
def test_bratstune_train_records_its_cohort_and_prints_the_runs_table_link(tmp_path, capsys):
    from bratstune.cli import main
    from bratstune.data.synthetic import generate_cohort

    cohort = tmp_path / "GLI-tiny"
    generate_cohort(cohort, challenge="GLI", cases=4, shape=(32, 32, 32), anatomy="procedural", seed=1, workers=1)
    config = tmp_path / "train.yaml"
    config.write_text(
        "model: {name: unet, kwargs: {filters: [8, 16, 32], deep_supr_num: 1}}\n"
        "data: {patch_size: [24, 24, 24], batch_size: 2, num_workers: 0}\n"
        "validation: {lesion_metrics: false}\n"
        "epochs: 1\nsteps_per_epoch: 1\nnum_threads: 1\ndevice: cpu\namp: 'off'\n"
    )
    argv = ["train", "--data", str(cohort), "--config", str(config), "--val-fraction", "0.25"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--experiment", "train-inputs"]) == 0
    printed = capsys.readouterr().out
    link = re.search(r"MLflow run ([0-9a-f]{32}) in experiment 'train-inputs': (.+)", printed)
    assert link and link.group(2).endswith("?workflowType=machine_learning"), printed
    run = MlflowClient(runs.tracking_uri()).get_run(link.group(1))
    (entry,) = run.inputs.dataset_inputs
    assert entry.dataset.name == "GLI-tiny" and entry.dataset.digest == run.data.tags["data.fingerprint"]
    assert json.loads(entry.dataset.profile) == {"num_cases": 4, "train_cases": 3, "val_cases": 1}
