"""The architecture study (jobs/architecture_study.py): every arm builds; a small grid runs with MLflow children."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace

import pytest

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def test_every_arm_is_a_valid_config_of_its_architecture(tmp_path):
    from bratstune.labels import get_scheme
    from bratstune.search.study import ARMS, StudySpec, arm_values, parameter_count, untrained_mae_encoder
    from bratstune.training.config import load_train_config

    study = StudySpec.smoke()
    encoder = untrained_mae_encoder(study, tmp_path / "mae")
    counts = {}
    for arm in ARMS:
        values = arm_values(study, arm, mae_encoder=str(encoder))
        config = load_train_config({**study.base(), **{k: v for k, v in values.items() if k != "_arm"}})
        assert config.model.name == arm.removesuffix("_mae")
        counts[arm] = parameter_count(study, values, get_scheme("brats2023"))
    assert counts["transunet_enc_mae"] == counts["transunet_enc"]  # same network, other initialisation
    assert len(set(counts.values())) == len(ARMS) - 1 and min(counts.values()) > 1000
    assert arm_values(study, "transunet_enc_mae", mae_encoder="x")["init"]["encoder_from"] == "x"
    from bratstune.errors import ConfigError

    with pytest.raises(ConfigError, match="mae-encoder"):
        arm_values(study, "transunet_enc_mae")
    with pytest.raises(ConfigError, match="unknown"):
        StudySpec(arms=("unet", "vnet"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_a_small_grid_writes_the_lesion_wise_table(tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    from bratstune.search.data import synthetic_cohort
    from bratstune.search.study import StudySpec, run_study, untrained_mae_encoder
    from bratstune.tracking import runs as tracking

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    study = replace(StudySpec.smoke(), arms=("unet", "transunet_enc_mae", "transunet_dec"))
    cohort = synthetic_cohort(cases=4, shape=(40, 40, 32), root=tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("study", uri=uri)
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False, log_to_driver=False)
    try:
        outcome = run_study(
            study,
            cohort,
            tracking_uri=uri,
            experiment_id=experiment_id,
            output_dir=tmp_path / "out",
            mae_encoder=str(untrained_mae_encoder(study, tmp_path / "mae")),
        )
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert [r["arm"] for r in outcome.rows] == list(study.arms)
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 and r["parameters"] > 0 for r in outcome.rows)
    assert all(0.0 <= r["val/dice_lesion_mean"] <= 1.0 for r in outcome.rows)
    lines = outcome.markdown.splitlines()
    assert "2 epochs x 2 steps" in lines[0] and "| arm | parameters | s/step | lesion Dice WT" in lines[2]
    assert sum(line.startswith("| transunet_enc_mae |") for line in lines) == 1
    assert outcome.csv_path.read_text().count("\n") == 1 + len(study.arms)

    client = MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["bratstune.kind"] == "study"
    assert {"study.md", "study.csv"} <= {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert sorted(c.data.params["search._arm"] for c in children) == sorted(study.arms)
    assert all(c.info.status == "FINISHED" for c in children)
    assert {r["mlflow_run_id"] for r in outcome.rows} == {c.info.run_id for c in children}
    mae_run = next(c for c in children if c.data.params["search._arm"] == "transunet_enc_mae")
    assert mae_run.data.params["init.encoder_from"].endswith("encoder.pt")
