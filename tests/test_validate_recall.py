"""Validation reports lesion-wise recall and precision (what a Tversky beta > alpha should raise)."""

from __future__ import annotations

import math

import numpy as np

from bratstune.labels import get_scheme
from bratstune.training.validate import case_lesion_metrics


def test_recall_and_precision_count_lesions():
    ref = np.zeros((40, 40, 40), dtype=np.uint8)
    ref[2:8, 2:8, 2:8] = 2  # two edema lesions far apart (216 voxels each)
    ref[30:36, 30:36, 30:36] = 2
    pred = np.zeros_like(ref)
    pred[2:8, 2:8, 2:8] = 2  # finds one, misses the other ...
    pred[30:36, 2:8, 2:8] = 2  # ... and adds a false positive
    pred[16:18, 16:18, 16:18] = 2  # and another
    m = case_lesion_metrics(pred, ref, get_scheme("brats2023"), "GLI", (1, 1, 1))
    assert m["recall_lesion_WT"] == 0.5
    assert m["precision_lesion_WT"] == 1 / 3
    assert m["sensitivity_WT"] == 0.5  # voxels: half the reference found
    assert math.isnan(m["recall_lesion_ET"])  # no ET lesion: nothing to recall
    assert m["precision_lesion_ET"] != m["precision_lesion_ET"]  # and nothing predicted
    assert m["recall_lesion_mean"] == 0.5  # the mean over the regions that have lesions
