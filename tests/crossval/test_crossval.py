"""Cross-validation end to end on one real local Ray (127.0.0.1) and a real SQLite MLflow store.

3 folds of a tiny UNet on 9 procedural synthetic GLI cases: one CV parent run with three fold
child runs, one OOF probability file per case, a loadable 3-member ensemble shipping the tuned
thresholds, tuned OOF score >= default, and registration + promotion to ``champion``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

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
        "oof_default/dice_lesion_ET",
        "oof_tuned/dice_lesion_mean",
        "cv/dice_lesion_mean",
    ):
        assert key in parent.data.metrics, key

    # every case has exactly one OOF file; folds partition the cohort
    case_ids = sorted(c.case_id for c in discover(cohort).cases)
    oof = sorted(p.name for p in (outcome.out_dir / "oof").iterdir())
    assert oof == [f"{c}.npy" for c in case_ids]
    assert sorted(c for fold in outcome.folds for c in fold) == case_ids
    import numpy as np

    probs = np.load(outcome.out_dir / "oof" / oof[0])
    assert probs.dtype == np.float16 and probs.shape[0] == 3

    # tuned >= default on the pooled OOF cases
    assert outcome.oof_metrics_tuned["dice_lesion_mean"] >= outcome.oof_metrics_default["dice_lesion_mean"]
    assert len(outcome.fold_metrics) == 3

    # the saved ensemble loads with three members and the tuned thresholds
    loaded = Ensemble.load(outcome.ensemble_dir)
    assert len(loaded.members) == 3
    assert loaded.thresholds == pytest.approx(outcome.thresholds)
    assert loaded.lineage["cv_run_id"] == outcome.parent_run_id and loaded.lineage["search_run_id"] == "0" * 32
    assert loaded.metrics["cv/dice_lesion_mean"] == pytest.approx(outcome.oof_metrics_tuned["dice_lesion_mean"])
    assert loaded.training_fingerprint

    # registered and promoted: the first version becomes the champion
    assert outcome.registered == "bratstune-gli/1"
    assert outcome.promotion is not None and outcome.promotion.promoted
    mlflow.set_tracking_uri(uri)
    champion = client.get_model_version_by_alias("bratstune-gli", "champion")
    assert str(champion.version) == "1" and champion.run_id == outcome.parent_run_id
    assert champion.tags["lineage.cv_run_id"] == outcome.parent_run_id
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
