"""Threshold search on cached probabilities: decode, post-process, score, search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bratstune.inference.decode import DecodeSettings
from bratstune.labels import get_scheme, labels_to_regions
from bratstune.search.threshold_space import load_threshold_space
from bratstune.search.thresholds import CachedCase, evaluate, search_thresholds, settings_mapping

ROOT = Path(__file__).resolve().parents[2]


def _case(seed: int = 0, shape=(32, 32, 24)) -> CachedCase:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[8:24, 8:24, 6:18] = 2  # oedema
    label[11:21, 11:21, 8:16] = 1  # necrosis
    label[13:19, 13:19, 10:14] = 3  # enhancing
    scheme = get_scheme("brats2023")
    regions = labels_to_regions(label, scheme).astype(np.float32)
    probs = 0.7 * regions + rng.uniform(0.0, 0.45, regions.shape)  # thresholds above ~0.45 recover the truth
    return CachedCase(f"case{seed}", np.clip(probs, 0, 1).astype(np.float16), label, (1.0, 1.0, 1.0))


def test_trial_values_become_decode_settings_and_the_yaml_shape():
    settings = DecodeSettings.from_values(
        {"thresholds.WT": 0.3, "min_size.ET": 5, "fill_holes": True}, ("WT", "TC", "ET")
    )
    assert settings.thresholds == {"WT": 0.3, "TC": 0.5, "ET": 0.5}
    nested = settings_mapping(settings)
    assert nested == {
        "thresholds": {"WT": 0.3, "TC": 0.5, "ET": 0.5},
        "postprocess": {"min_size": {"ET": 5}, "fill_holes": True},
    }
    assert DecodeSettings.from_mapping(nested) == settings  # what best_postprocess.yaml / thresholds.yaml load back


def test_minimum_size_removes_dust_and_holes_are_filled():
    scheme = get_scheme("brats2023")
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[5:15, 5:15, 5:15] = 2
    labels[9, 9, 9] = 0  # a hole
    labels[1, 1, 1] = 2  # dust
    out = DecodeSettings.from_values({"min_size.WT": 10, "fill_holes": True}, ()).apply_postprocess(labels, scheme)
    assert out[1, 1, 1] == 0 and out[9, 9, 9] != 0
    assert DecodeSettings.from_values({"fill_holes": False}, ()).apply_postprocess(labels, scheme) is labels


def test_search_reports_its_best_trial_and_scores_it_again():
    scheme = get_scheme("brats2023")
    cases = [_case(0), _case(1)]
    spec = load_threshold_space(ROOT / "search_spaces" / "thresholds.yaml")
    default = evaluate(cases, scheme, DecodeSettings(), challenge="GLI")
    assert {"dice_WT", "dice_lesion_ET", "dice_lesion_mean", "hd95_lesion_mean"} <= set(default)
    outcome = search_thresholds(spec, cases, scheme, challenge="GLI", num_samples=15)
    assert outcome.trials == 15 and outcome.table[0]["thresholds.WT"] == 0.5  # the default is trial 0
    assert outcome.baseline_metric == pytest.approx(default["dice_lesion_mean"])
    # the search's own bookkeeping (its first trial is the default, so no tuned-vs-default claim here:
    # out-of-sample comparisons are cross-fitted, tests/crossval/test_leakage.py)
    assert outcome.best_metric == max(row["dice_lesion_mean"] for row in outcome.table)
    assert outcome.per_minute > 0
    assert set(outcome.best_values) == {p.name for p in spec.params}
    assert outcome.best == DecodeSettings.from_values(outcome.best_values, ("WT", "TC", "ET"))
    rescored = evaluate(cases, scheme, outcome.best, challenge="GLI")
    assert rescored["dice_lesion_mean"] == pytest.approx(outcome.best_metric)


@pytest.mark.mlflow
def test_trained_model_loads_from_a_run_id_and_its_download_is_removed(tmp_path, monkeypatch):
    import tempfile

    import torch
    from mlflow.tracking import MlflowClient

    from bratstune.search.threshold_job import load_trained_model
    from bratstune.tracking import runs as tracking
    from bratstune.training.checkpoint import save_best
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    scheme = get_scheme("brats2023")
    config = resolve_config(
        load_train_config(
            {
                "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
                "data": {"patch_size": [24, 24, 24]},
            }
        )
    )
    torch.manual_seed(0)
    model = build_network(config, scheme)
    best = save_best(tmp_path / "best", model=model, config=config.to_dict(), metrics={"val/dice_mean": 0.5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("thresholds", uri=uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifacts(run_id, str(best), "best_model")  # as search trials log their best model
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))

    for source in (best, run_id, f"runs:/{run_id}/best_model"):
        loaded, loaded_config = load_trained_model(source, scheme)
        assert loaded_config.model.kwargs["filters"] == [8, 16, 32]
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)
    assert list(downloads.iterdir()) == []  # every temporary download removed after loading
    assert best.is_dir()  # a local folder is used as it is, never removed
