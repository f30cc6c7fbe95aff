"""BraTS 2023 lesion-wise Dice and HD95 (GLI, SSA, MEN, MET, PED 2023 challenges).

Rules, per region R (a set of label values), with dilation ``d`` and minimum volume ``v`` per challenge:

1. GT lesions: 26-connected components of ``dilate(GT_R, d)`` (18-neighbour structure, ``d``
   iterations); each original GT voxel takes the id of its dilated component.
2. Predicted components: 26-connected components of ``P_R``, whole and never clipped.
3. For each GT lesion ``L``: the components touching ``dilate(L, d)`` are its match (a component may
   serve several lesions); ``Dice_L = 2|L ∩ U| / (|L| + |U|)`` and ``HD95_L`` (DeepMind surfel
   definition) against their union ``U``. No component: ``Dice_L = 0``, ``HD95_L = 374``.
4. Components touching no dilated GT lesion are false positives (no size filter; components that
   touch only a lesion below the threshold are not false positives).
5. Lesions with ``|L|·voxel volume ≤ v`` are left out of the averages, hit or missed. With ``K``
   kept lesions and ``F`` false positives:

       lesion-wise Dice = Σ_kept Dice_L / (K + F)
       lesion-wise HD95 = (Σ_kept HD95_L + 374·F) / (K + F)         (K + F = 0: Dice 1, HD95 0)

Legacy whole-region metrics: Dice (1 if both empty), HD95 (0 if both empty, 374 if one is),
BraTS sensitivity / specificity, and TP/FP/FN lesion counts (of kept lesions, and all FPs).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bratstune.metrics import legacy
from bratstune.metrics.components import (
    component_sizes,
    components,
    dilate,
    dilation_merged_lesions,
    expand,
    object_boxes,
)
from bratstune.metrics.surface import ComponentSurfaces, bounding_box, surfel_distances_from_points

__all__ = ["CHALLENGE_RULES", "HD95_MISS", "REGIONS", "Rule", "evaluate_region"]

HD95_MISS = 374.0  # mm, the 2023 penalty for a missed lesion or a false positive


@dataclass(frozen=True)
class Rule:
    """Lesion rules of one challenge: GT dilation (iterations) and minimum lesion volume (mm³)."""

    dilation: int
    min_volume: float


CHALLENGE_RULES: Mapping[str, Rule] = {
    "GLI": Rule(dilation=3, min_volume=50.0),
    "SSA": Rule(dilation=3, min_volume=50.0),
    "MEN": Rule(dilation=1, min_volume=50.0),
    "PED": Rule(dilation=3, min_volume=50.0),
    "MET": Rule(dilation=1, min_volume=2.0),
}

# the 2023 challenges all used labels 1 NCR, 2 ED, 3 ET and these regions
REGIONS: Mapping[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def _voxel_volume(spacing: Sequence[float]) -> float:
    return float(spacing[0]) * float(spacing[1]) * float(spacing[2])


def _lesions(gt: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """``dilation_merged_lesions`` computed inside the GT's own box (plus the dilation margin)."""
    box = bounding_box(gt)
    if box is None:
        return np.zeros(gt.shape, dtype=np.uint32), 0
    box = expand(box, dilation + 1, gt.shape)
    sub, n = dilation_merged_lesions(gt[box], dilation)
    lesions = np.zeros(gt.shape, dtype=np.uint32)
    lesions[box] = sub
    return lesions, n


def evaluate_region(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    rule: Rule,
    spacing: Sequence[float],
    total_voxels: int | None = None,
    lesion_table: bool = False,
) -> dict:
    """Lesion-wise and legacy metrics of one binary region.

    Args:
        pred, gt: boolean arrays ``(X, Y, Z)``: the region in the prediction and ground truth; may be
            a crop of the case provided it holds all foreground plus ``rule.dilation`` voxels of
            margin (or reaches the volume's edge).
        rule: dilation and minimum lesion volume.
        spacing: voxel size (mm).
        total_voxels: voxels of the whole volume (for specificity) when the arrays are a crop.
        lesion_table: also return ``"lesions"``, one row per GT lesion.

    Returns:
        dict with ``lesionwise_dice``, ``lesionwise_hd95``, ``legacy_dice``, ``legacy_hd95``,
        ``num_tp``, ``num_fp``, ``num_fn``, ``sensitivity``, ``specificity``, ``iou``,
        ``precision``, ``recall``, ``gt_volume``, ``pred_volume``, voxel ``confusion`` counts, and
        ``lesions`` if asked.
    """
    spacing = tuple(float(s) for s in spacing)
    voxel_volume = _voxel_volume(spacing)
    conf = legacy.confusion(pred, gt, total=total_voxels)

    lesions, n_lesions = _lesions(gt, rule.dilation)
    gt_cc, n_gtcc = components(gt)
    pred_cc, n_pred = components(pred)
    # each GT 26-component lies inside one lesion; its surface is part of that lesion's surface
    lesion_of = np.zeros(n_gtcc + 1, dtype=np.int64)
    lesion_of[gt_cc[gt]] = lesions[gt]
    gt_sizes = component_sizes(gt_cc, gt, n_gtcc)
    pred_sizes = component_sizes(pred_cc, pred, n_pred)
    both = gt & pred
    code = gt_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both].astype(np.int64)
    pair_code, pair_count = np.unique(code, return_counts=True)
    pair_gt, pair_pred = pair_code // (n_pred + 1), pair_code % (n_pred + 1)

    lesion_boxes = object_boxes(lesions, n_lesions) if n_lesions else []
    gt_surf = ComponentSurfaces(gt_cc, object_boxes(gt_cc, n_gtcc), "surfel") if n_gtcc else None
    pred_surf = ComponentSurfaces(pred_cc, object_boxes(pred_cc, n_pred), "surfel") if n_pred else None

    touched: set[int] = set()
    rows = []
    for index in range(n_lesions):
        lesion_id = index + 1
        search = expand(lesion_boxes[index], rule.dilation, gt.shape)
        reach = dilate(lesions[search] == lesion_id, rule.dilation)
        hits = [int(h) for h in np.unique(pred_cc[search][reach]) if h != 0]
        parts = np.flatnonzero(lesion_of == lesion_id)
        count = int(gt_sizes[parts].sum())
        volume = count * spacing[0] * spacing[1] * spacing[2]
        if hits:
            inter = int(pair_count[np.isin(pair_gt, parts) & np.isin(pair_pred, hits)].sum())
            dice = 2.0 * inter / (count + int(pred_sizes[hits].sum()))
            g_pts, g_codes = gt_surf.select(parts.tolist())
            p_pts, p_codes = pred_surf.select(hits)
            hd95 = surfel_distances_from_points(g_pts, g_codes, p_pts, p_codes, spacing).robust_hausdorff(95.0)
            touched.update(hits)
        else:
            dice, hd95 = 0.0, HD95_MISS
        rows.append(
            {
                "lesion": lesion_id,
                "voxels": count,
                "volume": volume,
                "counted": volume > rule.min_volume,
                "components": hits,
                "dice": dice,
                "hd95": hd95,
            }
        )

    n_fp = n_pred - len(touched)
    kept = [r for r in rows if r["counted"]]
    n_tp = sum(1 for r in kept if r["components"])
    n_fn = len(kept) - n_tp
    denominator = len(kept) + n_fp
    if denominator == 0:
        lw_dice, lw_hd95 = 1.0, 0.0
    else:
        lw_dice = sum(r["dice"] for r in kept) / denominator
        lw_hd95 = (sum(r["hd95"] for r in kept) + HD95_MISS * n_fp) / denominator

    # legacy whole-region metrics
    if conf.pred_count == 0 and conf.gt_count == 0:
        legacy_hd95 = 0.0
    elif conf.pred_count == 0 or conf.gt_count == 0:
        legacy_hd95 = HD95_MISS
    elif n_lesions == 1 and n_fp == 0:
        legacy_hd95 = rows[0]["hd95"]  # the one lesion and its match are the whole region
    else:
        legacy_hd95 = surfel_distances_from_points(
            gt_surf.points, gt_surf.codes, pred_surf.points, pred_surf.codes, spacing
        ).robust_hausdorff(95.0)

    result = {
        "lesionwise_dice": float(lw_dice),
        "lesionwise_hd95": float(lw_hd95),
        "legacy_dice": legacy.dice(conf),
        "legacy_hd95": float(legacy_hd95),
        "num_tp": n_tp,
        "num_fp": n_fp,
        "num_fn": n_fn,
        "num_gt_lesions": n_lesions,
        "num_pred_components": n_pred,
        "sensitivity": legacy.sensitivity(conf),
        "specificity": legacy.specificity(conf),
        "iou": legacy.iou(conf),
        "precision": legacy.precision(conf),
        "recall": legacy.recall(conf),
        "gt_volume": conf.gt_count * voxel_volume,
        "pred_volume": conf.pred_count * voxel_volume,
        "confusion": conf.as_dict(),
    }
    if lesion_table:
        result["lesions"] = rows
    return result
