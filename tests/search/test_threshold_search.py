"""Threshold search on cached probabilities: decode, post-process, score, search."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bratstune.labels import get_scheme, labels_to_regions
from bratstune.search.thresholds import (
    CachedCase,
    apply_postprocess,
    evaluate,
    load_threshold_space,
    search_thresholds,
    split_values,
)

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


def test_split_values_reads_thresholds_and_postprocessing():
    thresholds, post = split_values({"thresholds.WT": 0.3, "min_size.ET": 5, "fill_holes": True}, ("WT", "TC", "ET"))
    assert thresholds == {"WT": 0.3, "TC": 0.5, "ET": 0.5}
    assert post == {"min_size": {"ET": 5}, "fill_holes": True}


def test_minimum_size_removes_dust_and_holes_are_filled():
    scheme = get_scheme("brats2023")
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[5:15, 5:15, 5:15] = 2
    labels[9, 9, 9] = 0  # a hole
    labels[1, 1, 1] = 2  # dust
    out = apply_postprocess(labels, scheme, {"min_size": {"WT": 10}, "fill_holes": True})
    assert out[1, 1, 1] == 0 and out[9, 9, 9] != 0
    assert apply_postprocess(labels, scheme, {"min_size": {}, "fill_holes": False}) is labels


def test_search_beats_or_matches_the_default_thresholds():
    scheme = get_scheme("brats2023")
    cases = [_case(0), _case(1)]
    spec = load_threshold_space(ROOT / "search_spaces" / "thresholds.yaml")
    default = evaluate(cases, scheme, {}, challenge="GLI")
    assert {"dice_WT", "dice_lesion_ET", "dice_lesion_mean", "hd95_lesion_mean"} <= set(default)
    outcome = search_thresholds(spec, cases, scheme, challenge="GLI", num_samples=15)
    assert outcome.trials == 15 and outcome.table[0]["thresholds.WT"] == 0.5  # the default is trial 0
    assert outcome.baseline_metric == pytest.approx(default["dice_lesion_mean"])
    assert outcome.best_metric >= outcome.baseline_metric
    assert outcome.per_minute > 0
    assert set(outcome.best_values) == {p.name for p in spec.params}
