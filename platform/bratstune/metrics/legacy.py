"""Whole-volume ("legacy") overlap metrics of one binary region: Dice, IoU, confusion counts.

Each is a pure function of two boolean arrays of the same shape ``(X, Y, Z)`` (or of the confusion
counts). With ``TP = |P ∩ G|``, ``FP = |P \\ G|``, ``FN = |G \\ P|``, ``TN = N − |P ∪ G|``:

    Dice = 2·TP / (2·TP + FP + FN)        IoU = TP / (TP + FP + FN)
    precision = TP / (TP + FP)            recall = sensitivity = TP / (TP + FN)
    specificity = TN / (TN + FP)

The BraTS 2023 code conventions are kept: Dice = 1 when both masks are empty; sensitivity and
specificity divide by ``(denominator + smallest positive float)`` and sensitivity is 1 when both
masks are empty.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

__all__ = ["Confusion", "confusion", "dice", "iou", "precision", "recall", "sensitivity", "specificity"]


@dataclass(frozen=True)
class Confusion:
    """Voxel confusion counts of a binary region."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def pred_count(self) -> int:
        return self.tp + self.fp

    @property
    def gt_count(self) -> int:
        return self.tp + self.fn

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


def confusion(pred: np.ndarray, gt: np.ndarray, *, total: int | None = None) -> Confusion:
    """Confusion counts of boolean ``pred`` against ``gt``.

    Args:
        pred, gt: boolean arrays of one shape.
        total: number of voxels of the whole volume when ``pred``/``gt`` are crops of it (so that
            TN counts the voxels outside the crop); defaults to ``pred.size``.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have one shape, got {pred.shape} and {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    n_pred = int(np.count_nonzero(pred))
    n_gt = int(np.count_nonzero(gt))
    size = pred.size if total is None else int(total)
    return Confusion(tp=tp, fp=n_pred - tp, fn=n_gt - tp, tn=size - (n_pred + n_gt - tp))


def dice(c: Confusion) -> float:
    """2·TP / (|P| + |G|); 1.0 when both are empty."""
    denominator = c.pred_count + c.gt_count
    return 1.0 if denominator == 0 else 2.0 * c.tp / denominator


def iou(c: Confusion) -> float:
    """TP / |P ∪ G|; 1.0 when both are empty."""
    union = c.tp + c.fp + c.fn
    return 1.0 if union == 0 else c.tp / union


def precision(c: Confusion) -> float:
    """TP / |P|; NaN when the prediction is empty."""
    return float("nan") if c.pred_count == 0 else c.tp / c.pred_count


def recall(c: Confusion) -> float:
    """TP / |G|; NaN when the ground truth is empty."""
    return float("nan") if c.gt_count == 0 else c.tp / c.gt_count


def sensitivity(c: Confusion) -> float:
    """BraTS 2023: TP / (TP + FN + ε), and 1.0 when prediction and ground truth are both empty."""
    if c.pred_count == 0 and c.gt_count == 0:
        return 1.0
    return c.tp / (c.tp + c.fn + sys.float_info.min)


def specificity(c: Confusion) -> float:
    """BraTS 2023: TN / (TN + FP + ε)."""
    return c.tn / (c.tn + c.fp + sys.float_info.min)
