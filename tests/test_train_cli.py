"""`bratstune train` end to end: tiny procedural cohort -> cache -> fit -> MLflow (SQLite in tmp)."""

from __future__ import annotations

import pytest

from bratstune.cli import main

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def raw_cohort(tmp_path_factory):
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("raw")
    generate_cohort(root, challenge="GLI", cases=5, shape=(32, 32, 32), anatomy="procedural", seed=1, workers=1)
    return root


def test_train_command_end_to_end(raw_cohort, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from bratstune.tracking import runs as tracking

    config = tmp_path / "train.yaml"
    config.write_text(
        "model: {name: unet, kwargs: {filters: [8, 16, 32], deep_supr_num: 1}}\n"
        "loss: {weights: {dice: 1.0, ce: 1.0}, mode: region}\n"
        "optim: {name: adam, lr: 1.0e-2, schedule: cosine, warmup_fraction: 0.0}\n"
        "data: {patch_size: [24, 24, 24], batch_size: 2, fg_prob: 0.7, num_workers: 1}\n"
        "epochs: 2\nsteps_per_epoch: 2\nnum_threads: 1\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "train",
            "--data",
            str(raw_cohort),
            "--config",
            str(config),
            "--set",
            "optim.lr=0.005",
            "--set",
            "validation.overlap=0.5",
            "--val-fraction",
            "0.2",
            "--out",
            str(out),
            "--experiment",
            "cli-test",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "4 training / 1 validation cases" in printed
    assert "validation Dice at the best epoch" in printed and " WT " in printed and " ET " in printed
    assert (out / "best" / "model.pt").is_file() and (out / "validation.png").is_file()
    assert (out / "checkpoints" / "epoch_0002" / "state.pt").is_file()

    client = MlflowClient(tracking.tracking_uri())  # the default SQLite store under BRATSTUNE_HOME
    experiment = client.get_experiment_by_name("cli-test")
    assert experiment.artifact_location.startswith("file:///")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.005" and params["validation.overlap"] == "0.5"  # --set applied
    assert params["challenge"] == "GLI"  # inferred from the case names
    assert params["model.kwargs.patch_size"] == "[24, 24, 24]"  # resolved config
    assert run.data.tags["data.fingerprint"] and run.data.tags["data.val_cases"] == "1"
    assert len(client.get_metric_history(run.info.run_id, "val/dice_WT")) == 2
    assert len(client.get_metric_history(run.info.run_id, "time/data_wait_s")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "validation.png", "best_model"} <= artifacts
    assert "best_model/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "best_model")}


def test_train_command_preset_and_bad_override(raw_cohort, tmp_path, capsys):
    code = main(
        ["train", "--data", str(raw_cohort), "--preset", "unet", "--set", "optim.lrr=1", "--out", str(tmp_path)]
    )
    assert code == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    code = main(["train", "--data", str(raw_cohort), "--preset", "unett"])
    assert code == 2
    assert "did you mean 'unet'" in capsys.readouterr().err
