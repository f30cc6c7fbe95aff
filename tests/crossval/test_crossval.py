"""Cross-validation end to end on one real local Ray (127.0.0.1) and a real SQLite MLflow store.

3 folds of a tiny UNet on 9 procedural synthetic GLI cases (about 2 kept out as the gate split):
one CV parent run with three fold child runs, one OOF probability file per CV case, case records
that keep every fold's held-out cases out of its training, epoch selection and decode tuning, the
cross-fitted (``cv/oos/*``) and in-sample (``cv/in_sample/*``) figures, a loadable 3-member
ensemble shipping the deployed thresholds, and registration + promotion to ``champion``; the same
ensemble registered again is compared with the champion on the gate cases and not promoted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

# Before this process first talks to Ray (see tests/search/test_search_ray.py and STACK-NOTES).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
os.environ.update(RAY_ENV)

CONFIG = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supervision": False}},
    "loss": {"weights": {"dice": 1.0, "ce": 1.0}, "mode": "region"},
    "data": {"patch_size": [24, 24, 24], "batch_size": 2, "num_workers": 0},
    "validation": {"lesion_metrics": False, "overlap": 0.25},
    "epochs": 2,
    "steps_per_epoch": 3,
    "device": "cpu",
    "amp": "off",
    "challenge": "GLI",
}


@pytest.fixture()
def local_ray(monkeypatch):
    import ray

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        configure_logging=False,
        log_to_driver=bool(os.environ.get("CV_DEBUG")),
    )
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.mlflow
def test_three_folds_give_a_tuned_registered_champion_ensemble(local_ray, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from bratstune.data.layout import discover
    from bratstune.ensemble.package import Ensemble
    from bratstune.search import crossval
    from bratstune.search.data import synthetic_cohort
    from bratstune.tracking import runs as tracking

    started = time.perf_counter()
    cohort = synthetic_cohort(cases=9, shape=(40, 40, 32), anatomy="procedural", root=tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("cv-test", uri=uri)

    spec = crossval.CrossValSpec.from_mapping(
        {
            "folds": 3,
            "seed": 0,
            "storage_path": str(tmp_path / "results"),
            "name": "cv-test",
            "threshold_trials": 12,
            "search_run_id": "0" * 32,
            "resources": {"cpu": 1},
            "register": "bratstune-gli",
            "promote": True,
        }
    )
    outcome = crossval.cross_validate(
        CONFIG,
        cohort,
        spec,
        experiment_id=experiment_id,
        tracking_uri=uri,
        cache_root=tmp_path / "cache",
        verbose=0,
    )

    # MLflow: one parent, three FINISHED fold children with per-epoch and OOF metrics
    client = MlflowClient(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["bratstune.kind"] == "crossval"
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    assert len(children) == 3
    assert sorted(c.data.tags["cv.fold"] for c in children) == ["0", "1", "2"]
    assert sorted(c.info.run_name.split("-")[0] for c in children) == ["fold0", "fold1", "fold2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["stop_reason"] == "completed"
        assert "train/loss" in child.data.metrics and "val/dice_mean" in child.data.metrics
        assert "oof/dice_lesion_mean" in child.data.metrics
        assert any(a.path.startswith("best_model") for a in client.list_artifacts(child.info.run_id))
    for key in (
        "fold0/oof/dice_lesion_WT",
        "fold2/oof/dice_lesion_mean",
        "fold1/oos/dice_lesion_mean",
        "oof_default/dice_lesion_ET",
        "cv/oos/dice_lesion_mean",
        "cv/oos/hd95_lesion_WT",
        "cv/oos/hd95_lesion_mean",
        "cv/in_sample/dice_lesion_mean",
        "cv/dice_lesion_mean",
    ):
        assert key in parent.data.metrics, key
    assert parent.data.metrics["cv/dice_lesion_mean"] == parent.data.metrics["cv/oos/dice_lesion_mean"]
    assert parent.data.metrics["cv/oos/dice_lesion_mean"] == pytest.approx(outcome.oos_metrics["dice_lesion_mean"])
    assert parent.data.params["cv.selection"] == "inner"
    for child in children:
        assert "oos/dice_lesion_mean" in child.data.metrics

    # a gate split kept out; every CV case has exactly one OOF file; folds partition the CV cases
    case_ids = sorted(c.case_id for c in discover(cohort).cases)
    assert outcome.gate and not set(outcome.gate) & {c for fold in outcome.folds for c in fold}
    cv_ids = sorted(c for fold in outcome.folds for c in fold)
    assert sorted(cv_ids + outcome.gate) == case_ids
    oof = sorted(p.name for p in (outcome.out_dir / "oof").iterdir())
    assert oof == [f"{c}.npy" for c in cv_ids]
    import numpy as np

    probs = np.load(outcome.out_dir / "oof" / oof[0])
    assert probs.dtype == np.float16 and probs.shape[0] == 3
    assert sorted(outcome.oos_cases) == cv_ids and len(outcome.fold_metrics) == 3

    # held out means held out, by the recorded case lists of every fold
    record = json.loads((outcome.out_dir / "cases.json").read_text())
    assert record["gate"] == sorted(outcome.gate) and record["tuned"] == cv_ids
    for k, fold in enumerate(record["folds"]):
        held = set(fold["held_out"])
        assert held == set(outcome.folds[k])
        for role in ("trained", "selected", "tuned"):
            assert not held & set(fold[role]), (k, role)
            assert not set(outcome.gate) & set(fold[role]), (k, role)
        assert fold["selected"]  # each fold chose its epoch on its own inner validation cases
    child_record = json.loads(
        Path(client.download_artifacts(outcome.fold_run_ids[0], "cases.json", str(tmp_path))).read_text()
    )
    assert child_record["held_out"] == record["folds"][0]["held_out"]

    # the saved ensemble loads with three members, the deployed thresholds and its case record
    loaded = Ensemble.load(outcome.ensemble_dir)
    assert len(loaded.members) == 3
    assert loaded.thresholds == pytest.approx(outcome.thresholds)
    assert loaded.lineage["cv_run_id"] == outcome.parent_run_id and loaded.lineage["search_run_id"] == "0" * 32
    assert json.loads(loaded.lineage["cases"])["gate"] == sorted(outcome.gate)
    assert loaded.metrics["cv/oos/dice_lesion_mean"] == pytest.approx(outcome.oos_metrics["dice_lesion_mean"])
    assert loaded.metrics["cv/in_sample/dice_lesion_mean"] == pytest.approx(
        outcome.in_sample_metrics["dice_lesion_mean"]
    )
    assert loaded.training_fingerprint

    # registered and promoted: the first version becomes the champion
    assert outcome.registered == "bratstune-gli/1"
    assert outcome.promotion is not None and outcome.promotion.promoted
    mlflow.set_tracking_uri(uri)
    champion = client.get_model_version_by_alias("bratstune-gli", "champion")
    assert str(champion.version) == "1" and champion.run_id == outcome.parent_run_id
    assert champion.tags["lineage.cv_run_id"] == outcome.parent_run_id
    assert champion.tags["selection.metric"] == "cv/oos/dice_lesion_mean"

    # the same ensemble again: compared with the champion on the gate cases, a tie is not promoted
    from bratstune.ensemble.gate import GateSpec
    from bratstune.search.crossval.packaging import register

    again = register(
        outcome.ensemble,
        "bratstune-gli",
        parent_run_id=outcome.parent_run_id,
        metric=outcome.metric,
        promote=True,
        force=False,
        gate=GateSpec(tta=False, min_cases=1),
    )
    assert again.registered == "bratstune-gli/2" and not again.promotion.promoted
    assert again.promotion.evidence.cases == sorted(outcome.gate) and again.promotion.evidence.mean == 0.0
    assert client.get_model_version("bratstune-gli", "2").tags["gate.cases"] == str(len(outcome.gate))
    print(f"cross-validation test took {time.perf_counter() - started:.1f} s")


@pytest.mark.mlflow
def test_config_comes_from_a_search_parent_run_and_label_mode_is_refused(tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    from bratstune.errors import ConfigError
    from bratstune.search import crossval
    from bratstune.tracking import runs as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("search", uri=uri)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id, run_name="search-parent").info.run_id
    client.log_text(run_id, yaml.safe_dump(CONFIG), "best_config.yaml")
    config = crossval.resolve_config(from_search=run_id, overrides=["epochs=5"])
    assert config["epochs"] == 5 and config["model"]["kwargs"]["filters"] == [8, 16, 32]
    with pytest.raises(ConfigError, match="exactly one"):
        crossval.resolve_config(preset="unet", from_search=run_id)
    label_mode = {**CONFIG, "loss": {"weights": {"dice": 1.0, "ce": 1.0}, "mode": "label"}}
    with pytest.raises(ConfigError, match="loss.mode: region"):
        crossval.cross_validate(label_mode, tmp_path / "no-data", crossval.CrossValSpec(folds=3))


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"fold": 3}, "did you mean 'folds'"),
        ({"folds": 1}, "k >= 2"),
        ({"threshold_trials": 0}, "threshold_trials"),
        ({"resources": {"cpu": 0}}, "resources.cpu"),
        ({"resources": {"cpus": 1}}, "did you mean 'cpu'"),
        ({"promote": "maybe"}, "true/false"),
        ({"selection": "best"}, "unknown selection"),
        ({"gate_fraction": 1.0}, "gate_fraction"),
        ({"inner_val_fraction": 0}, "inner_val_fraction"),
        ({"gate": {"margins": 0.1}}, "did you mean 'margin'"),
    ],
)
def test_crossval_spec_validation_names_the_fix(mapping, message):
    from bratstune.errors import ConfigError
    from bratstune.search.crossval import CrossValSpec

    with pytest.raises(ConfigError, match=message):
        CrossValSpec.from_mapping(mapping)


def test_crossval_spec_loads_from_yaml(tmp_path):
    from bratstune.search.crossval import CrossValSpec, load_crossval_spec

    path = tmp_path / "cv.yaml"
    path.write_text("folds: 3\nresources: {cpu: 2, gpu: 0.5}\nregister: bratstune-gli\npromote: true\n")
    spec = load_crossval_spec(path)
    assert spec == CrossValSpec(folds=3, resources=spec.resources, register="bratstune-gli", promote=True)
    assert spec.resources.as_tune() == {"cpu": 2.0, "gpu": 0.5}
    assert CrossValSpec().folds == 5 and CrossValSpec().experiment == "bratstune-cv"
