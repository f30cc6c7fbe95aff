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


# -- the fast path of ``evaluate`` / ``search_thresholds`` (``bratstune.search.decode_cache``) -------------


def _noisy_case(seed: int, shape=(40, 44, 36), spacing=(2.0, 2.0, 2.0), dtype=np.float16) -> CachedCase:
    """Several lesions (a tumour with core and rim, satellites) and probabilities with dust and holes."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(int(rng.integers(2, 5))):
        c = [int(rng.integers(8, n - 8)) for n in shape]
        r = int(rng.integers(5, 9)) if k == 0 else int(rng.integers(2, 4))
        grid = np.ogrid[tuple(slice(0, n) for n in shape)]
        d = np.sqrt(sum(((g - v) / r) ** 2 for g, v in zip(grid, c)))
        label[(d <= 1.0) & (label == 0)] = 2
        label[d <= 0.6] = 3
        label[d <= 0.35] = 1
    scheme = get_scheme("brats2023")
    regions = labels_to_regions(label, scheme).astype(np.float32)
    blurred = np.stack([ndimage.gaussian_filter(r, 1.2) for r in regions])
    probs = 0.8 * blurred + rng.uniform(0.0, 0.3, regions.shape)
    return CachedCase(f"noisy{seed}", np.clip(probs, 0, 1).astype(dtype), label, spacing)


def _random_settings(rng) -> DecodeSettings:
    values = {f"thresholds.{r}": float(rng.uniform(0.15, 0.85)) for r in ("WT", "TC", "ET")}
    values.update({f"min_size.{r}": int(rng.integers(0, 12)) * 5 for r in ("WT", "TC", "ET") if rng.random() < 0.8})
    values["fill_holes"] = bool(rng.random() < 0.5)
    return DecodeSettings.from_values(values, ("WT", "TC", "ET"))


def _equal(fast: dict, plain: dict) -> bool:
    return list(fast) == list(plain) and all(
        fast[k] == plain[k] or (np.isnan(fast[k]) and np.isnan(plain[k])) for k in plain
    )


@pytest.mark.parametrize(
    ("spacing", "dtype", "challenge"),
    [((2.0, 2.0, 2.0), np.float16, "GLI"), ((1.0, 1.0, 1.0), np.float16, "MET"), ((1.0, 1.0, 2.5), np.float32, "GLI")],
)
def test_fast_path_equals_the_plain_path_on_random_configurations(spacing, dtype, challenge):
    from bratstune.search.decode_cache import case_metrics, plain_case_metrics

    scheme = get_scheme("brats2023")
    cases = [_noisy_case(seed, spacing=spacing, dtype=dtype) for seed in range(3)]
    rng = np.random.default_rng(0)
    for trial in range(12):
        settings = DecodeSettings() if trial == 0 else _random_settings(rng)
        for case in cases:
            for lesion in (True, False) if trial < 2 else (True,):
                fast = case_metrics(case, scheme, settings, challenge, lesion, prepare=True)
                plain = plain_case_metrics(case, scheme, settings, challenge, lesion)
                assert _equal(fast, plain), (case.case_id, settings, fast, plain)
    assert all(case._prepared for case in cases)  # the fast path did run
    means = evaluate(cases, scheme, settings, challenge=challenge)
    plain_rows = [plain_case_metrics(c, scheme, settings, challenge, True) for c in cases]
    assert means["dice_lesion_mean"] == np.mean(
        [np.nanmean([r[f"dice_lesion_{k}"] for r in plain_rows]) for k in ("WT", "TC", "ET")]
    )


def test_other_grids_take_the_plain_path():
    """Off an exact grid (1.2 mm is no multiple of 1/16 mm) every scoring is the plain path's."""
    from bratstune.search.decode_cache import case_metrics, plain_case_metrics

    scheme = get_scheme("brats2023")
    case = _noisy_case(4, spacing=(1.0, 1.2, 2.0))
    settings = DecodeSettings.from_values({"thresholds.WT": 0.4, "min_size.ET": 5}, ("WT", "TC", "ET"))
    fast = case_metrics(case, scheme, settings, "GLI", True, prepare=True)
    assert _equal(fast, plain_case_metrics(case, scheme, settings, "GLI", True))
    assert not case._prepared


def test_fast_path_decodes_a_box_not_the_volume():
    from bratstune.search.decode_cache import PreparedCase, case_metrics, plain_case_metrics

    scheme = get_scheme("brats2023")
    case = _case(3, shape=(48, 48, 40))
    case.probs[:, :, :, :] = np.where(case.probs > 0.46, case.probs, 0).astype(np.float16)  # quiet background
    settings = DecodeSettings.from_values({"thresholds.WT": 0.5, "min_size.WT": 5, "fill_holes": True}, ("WT",))
    prepared = PreparedCase(case, scheme, "GLI")
    box = prepared.box(settings.thresholds_for(scheme.train_regions))
    assert np.prod([s.stop - s.start for s in box]) < case.label.size / 2
    fast = case_metrics(case, scheme, settings, "GLI", True, prepare=True)
    assert _equal(fast, plain_case_metrics(case, scheme, settings, "GLI", True))


def test_fast_path_handles_nan_and_replaced_arrays():
    from bratstune.search.decode_cache import case_metrics, plain_case_metrics

    scheme = get_scheme("brats2023")
    case = _noisy_case(7)
    settings = DecodeSettings.from_values({"thresholds.WT": 0.4, "thresholds.ET": 0.3}, ("WT", "TC", "ET"))
    assert case_metrics(case, scheme, settings, "GLI", True) == plain_case_metrics(case, scheme, settings, "GLI", True)
    assert list(case._prepared.values()) == [None]  # a one-off scoring stays on the plain path
    first = case_metrics(case, scheme, settings, "GLI", True)  # the second: prepared
    probs = case.probs.copy()
    half = probs[0, :20]
    half[case.label[:20] > 0] = np.nan  # NaN is below every threshold in both paths
    probs[1, 0, 0, 0] = 1.0
    prepared = dict(case._prepared)
    case.probs = probs  # another array: the prepared case is rebuilt
    second = case_metrics(case, scheme, settings, "GLI", True)
    assert _equal(second, plain_case_metrics(case, scheme, settings, "GLI", True))
    assert second["dice_WT"] < first["dice_WT"]
    assert all(case._prepared[k] is not v for k, v in prepared.items())


def test_search_in_two_processes_gives_the_one_process_table():
    scheme = get_scheme("brats2023")
    spec = load_threshold_space(ROOT / "search_spaces" / "thresholds.yaml")
    one = search_thresholds(spec, [_noisy_case(s) for s in range(3)], scheme, challenge="GLI", num_samples=6)
    two = search_thresholds(spec, [_noisy_case(s) for s in range(3)], scheme, challenge="GLI", num_samples=6, workers=2)
    assert [row for row in one.table] == [row for row in two.table]
    assert one.best_values == two.best_values


def test_postprocess_equals_its_definition():
    """Dust removal and hole filling (one labelling, lookups) against their definitions in scipy."""
    from scipy import ndimage

    from bratstune.inference.postprocess import fill_holes, remove_dust

    six = ndimage.generate_binary_structure(3, 1)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        shape = tuple(int(n) for n in rng.integers(6, 20, 3))
        labels = np.zeros(shape, np.uint8)
        for value, fraction in ((2, 0.4), (1, 0.2), (3, 0.1)):
            noise = ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0.6, 2.0))
            labels[noise > np.quantile(noise, 1 - fraction)] = value
        labels[rng.random(shape) < 0.05] = 0
        for mask in (labels > 0, labels == 3, np.isin(labels, (1, 3))):
            # holes: background 6-components off the border whose every 6-neighbour is in the mask
            expected = labels.copy()
            background = labels == 0
            cc, n = ndimage.label(background, structure=six)
            for k in range(1, n + 1):
                comp = cc == k
                ring = ndimage.binary_dilation(comp, structure=six) & ~comp
                touches_border = any(comp.take(i, axis=a).any() for a in range(3) for i in (0, -1))
                if not touches_border and np.all(mask[ring]):
                    expected[comp] = 9
            got = labels.copy()
            assert fill_holes(got, mask, 9) == int(np.count_nonzero(expected != labels))
            np.testing.assert_array_equal(got, expected)
            # dust: 26-components below the size
            size = int(rng.integers(2, 30))
            expected = labels.copy()
            cc, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
            for k in range(1, n + 1):
                if np.count_nonzero(cc == k) < size:
                    expected[cc == k] = 0
            got = labels.copy()
            assert remove_dust(got, mask, size) == int(np.count_nonzero(expected != labels))
            np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["brats2024_gli", "brats2024_ped", "legacy", "brats2024_men_rt"])
def test_fast_path_equals_the_plain_path_in_every_scheme(name):
    """Nested decode steps (``decode_inside``), extra regions and channels: still the same values."""
    from scipy import ndimage

    from bratstune.search.decode_cache import case_metrics, plain_case_metrics

    scheme = get_scheme(name)
    rng = np.random.default_rng(0)
    shape = (28, 30, 26)
    probs = np.stack([ndimage.gaussian_filter(rng.random(shape), 2) for _ in scheme.train_regions])
    probs = (probs - probs.min()) / (probs.max() - probs.min())
    label = np.zeros(shape, np.uint8)
    for value in sorted(scheme.labels):
        label[ndimage.gaussian_filter(rng.normal(size=shape), 2) > 0.25] = value
    case = CachedCase("c", probs.astype(np.float16), label, (1.0, 1.0, 1.0))
    for _ in range(5):
        values = {f"thresholds.{r}": float(rng.uniform(0.3, 0.7)) for r in scheme.train_regions}
        values.update({f"min_size.{r}": int(rng.integers(0, 20)) for r in scheme.regions if rng.random() < 0.5})
        values["fill_holes"] = bool(rng.random() < 0.5)
        settings = DecodeSettings.from_values(values, scheme.train_regions)
        fast = case_metrics(case, scheme, settings, "GLI", True, prepare=True)
        assert _equal(fast, plain_case_metrics(case, scheme, settings, "GLI", True))
