"""Ensemble selection on planted out-of-sample probabilities (pure NumPy, no training).

A library of five configurations over nine small GLI-like cases: ``good_a`` and ``good_b`` (the
truth under independent voxel noise, so their blend beats either), ``noisy`` (right shape, dusty
false positives that lesion-wise Dice punishes but voxel Dice hardly sees), ``shifted`` (truth
displaced) and ``broken`` (probability 0.9 everywhere: the whole volume is tumour).
"""

from __future__ import annotations

import numpy as np
import pytest

from bratstune.labels import get_scheme, labels_to_regions
from bratstune.search.crossval.crossfit import pool_metrics
from bratstune.search.crossval.ensemble_selection import crossfit_selection
from bratstune.search.selection import (
    Candidate,
    best_n_by_voxel_dice,
    equal_weights,
    greedy_selection,
    score_blend,
    select,
)
from bratstune.search.thresholds import CachedCase

SCHEME = get_scheme("brats2023")
SHAPE = (28, 28, 20)


def _label(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.integers(10, 18, size=3)
    label = np.zeros(SHAPE, dtype=np.uint8)
    x, y, z = c
    label[x - 6 : x + 6, y - 6 : y + 6, max(z - 5, 0) : z + 5] = 2  # oedema
    label[x - 3 : x + 3, y - 3 : y + 3, max(z - 3, 0) : z + 3] = 1  # necrosis
    label[x - 3 : x + 3, y - 3 : y + 3, max(z - 1, 0) : z + 1] = 3  # enhancing
    return label


def _library(n_cases: int = 9):
    rng = np.random.default_rng(0)
    refs, probs = [], {"good_a": {}, "good_b": {}, "noisy": {}, "shifted": {}, "broken": {}}
    for i in range(n_cases):
        label = _label(i)
        case_id = f"case{i}"
        refs.append(CachedCase(case_id, np.zeros(0), label, (1.0, 1.0, 1.0)))
        truth = labels_to_regions(label, SCHEME).astype(np.float32)
        for name in ("good_a", "good_b"):
            probs[name][case_id] = np.clip(0.75 * truth + 0.1 + rng.normal(0, 0.13, truth.shape), 0, 1)
        dust = (rng.random(truth.shape) > 0.998).astype(np.float32)  # scattered false-positive voxels
        probs["noisy"][case_id] = np.clip(0.7 * truth + 0.9 * dust + rng.uniform(0, 0.2, truth.shape), 0, 1)
        probs["shifted"][case_id] = np.clip(0.8 * np.roll(truth, 5, axis=1) + rng.uniform(0, 0.1, truth.shape), 0, 1)
        probs["broken"][case_id] = np.full(truth.shape, 0.9, dtype=np.float32)
    candidates = [Candidate(name, p) for name, p in probs.items()]
    return candidates, refs


@pytest.fixture(scope="module")
def library():
    return _library()


def test_greedy_selection_keeps_the_planted_good_members_and_drops_the_broken_one(library):
    candidates, refs = library
    chosen = greedy_selection(candidates, refs, SCHEME, challenge="GLI", max_steps=4)
    assert chosen.method == "greedy" and chosen.metric == "dice_lesion_mean" and len(chosen.history) == 5
    assert {"good_a", "good_b"} <= set(chosen.members) and "broken" not in chosen.members
    total = sum(chosen.weights.values())
    assert chosen.weights["good_a"] + chosen.weights["good_b"] >= 2 * total / 3
    alone = {c.name: score_blend(candidates, {c.name: 1}, refs, SCHEME, challenge="GLI") for c in candidates}
    assert chosen.score > max(alone.values()) + 0.1  # blending the independent good members pays
    assert chosen.score == pytest.approx(score_blend(candidates, chosen.weights, refs, SCHEME, challenge="GLI"))


def test_the_baselines_differ_from_metric_aware_selection(library):
    candidates, refs = library
    equal = equal_weights(candidates, refs, SCHEME, challenge="GLI")
    assert equal.weights == dict.fromkeys(["broken", "good_a", "good_b", "noisy", "shifted"], 1)
    voxel = {
        c.name: score_blend(candidates, {c.name: 1}, refs, SCHEME, challenge=None, metric="dice_mean")
        for c in candidates
    }
    top2 = best_n_by_voxel_dice(candidates, refs, SCHEME, n=2, challenge="GLI")
    assert set(top2.members) == set(sorted(voxel, key=lambda n: -voxel[n])[:2])
    assert "noisy" in top2.members  # voxel Dice cannot see the dust that lesion-wise Dice punishes
    greedy = select("greedy", candidates, refs, SCHEME, challenge="GLI", max_steps=4)
    assert greedy.score > top2.score and greedy.score > equal.score
    with pytest.raises(ValueError, match="unknown selector"):
        select("best", candidates, refs, SCHEME, challenge="GLI")


def test_every_candidate_must_cover_the_selection_cases(library):
    candidates, refs = library
    partial = Candidate("partial", {"case0": candidates[0].probs["case0"]})
    with pytest.raises(ValueError, match="partial.*no out-of-sample probabilities"):
        greedy_selection([*candidates, partial], refs, SCHEME, challenge="GLI")
    with pytest.raises(ValueError, match="unique"):
        equal_weights([candidates[0], candidates[0]])


def test_cross_fitted_selection_scores_each_fold_with_choices_made_on_the_others(library):
    candidates, refs = library
    folds = [refs[0:3], refs[3:6], refs[6:9]]
    result = crossfit_selection(candidates, folds, SCHEME, challenge="GLI", method="greedy", max_steps=2)
    assert sorted(result.case_metrics) == sorted(r.case_id for r in refs)
    for k, fold in enumerate(folds):
        assert not {c.case_id for c in fold} & set(result.fold_tuned_on[k])  # never chosen on its own cases
        assert "broken" not in result.fold_selections[k].members
    assert result.oos == pytest.approx(pool_metrics(result.case_metrics, tuple(SCHEME.regions)))
    assert "dice_lesion_mean" in result.oos and "hd95_lesion_mean" in result.oos
    equal = crossfit_selection(candidates, folds, SCHEME, challenge="GLI", method="equal")
    assert result.oos["dice_lesion_mean"] > equal.oos["dice_lesion_mean"]
