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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bratstune.metrics import legacy
from bratstune.metrics.components import component_sizes, components, dilate, expand
from bratstune.metrics.surface import ComponentSurfaces, SurfaceDistances, bounding_box
from bratstune.metrics.surfel_table import surfel_area_table

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


def _lesions(gt: np.ndarray, dilation: int) -> tuple[np.ndarray, np.ndarray, int]:
    """BraTS 2023 lesions, computed inside the GT's own box (plus the dilation margin).

    Returns ``(lesions, reach, n)``: lesion ids on the GT voxels, and the 26-components of
    ``dilate(GT, d)`` themselves. ``reach == L`` is exactly ``dilate(L, d)`` (a voxel within ``d``
    18-steps of the GT is joined by that path to the GT voxel it came from, and that voxel is in the
    same component), so the components a lesion touches come from one pass over ``reach`` instead
    of one dilation per lesion.
    """
    box = bounding_box(gt)
    if box is None:
        empty = np.zeros(gt.shape, dtype=np.uint32)
        return empty, empty, 0
    box = expand(box, dilation + 1, gt.shape)
    reach_box, n = components(dilate(gt[box], dilation))
    reach = np.zeros(gt.shape, dtype=np.uint32)
    reach[box] = reach_box
    lesions = np.where(gt, reach, 0).astype(np.uint32, copy=False)
    return lesions, reach, n


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

    lesions, reach, n_lesions = _lesions(gt, rule.dilation)
    pred_cc, n_pred = components(pred)
    pred_sizes = component_sizes(pred_cc, pred, n_pred)
    gt_sizes = np.bincount(lesions[gt], minlength=n_lesions + 1)
    # every predicted voxel on a lesion voxel belongs to a component that touches the dilated
    # lesion, so |L ∩ U| is just the lesion's overlap with the prediction
    inter = np.bincount(lesions[gt & pred], minlength=n_lesions + 1)
    # components touching each dilated lesion: (lesion, component) pairs over the dilated voxels
    touching = (reach != 0) & (pred_cc != 0)
    pairs = np.unique(reach[touching].astype(np.int64) * (n_pred + 1) + pred_cc[touching])
    pair_lesion, pair_pred = pairs // (n_pred + 1), pairs % (n_pred + 1)
    hits_of = np.split(pair_pred, np.searchsorted(pair_lesion, np.arange(2, n_lesions + 1)))

    gt_surf = ComponentSurfaces(gt, lesions, "surfel") if n_lesions else None
    pred_surf = ComponentSurfaces(pred, pred_cc, "surfel") if n_pred else None
    areas = surfel_area_table(spacing)

    rows = []
    for index in range(n_lesions):
        lesion_id = index + 1
        hits = [int(h) for h in hits_of[index]] if n_pred else []
        count = int(gt_sizes[lesion_id])
        volume = count * spacing[0] * spacing[1] * spacing[2]
        if hits:
            dice = 2.0 * int(inter[lesion_id]) / (count + int(pred_sizes[hits].sum()))
            g_pts, g_codes = gt_surf.select([lesion_id])
            p_pts, p_codes = pred_surf.select(hits)
            select = hits[0] if len(hits) == 1 else hits
            hd95 = SurfaceDistances(
                pred_surf.distances_to(g_pts, spacing, select),
                areas[g_codes],
                gt_surf.distances_to(p_pts, spacing, lesion_id),
                areas[p_codes],
            ).robust_hausdorff(95.0)
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
    touched = set(pair_pred.tolist())

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
        legacy_hd95 = SurfaceDistances(
            pred_surf.distances_to(gt_surf.points, spacing),
            areas[gt_surf.codes],
            gt_surf.distances_to(pred_surf.points, spacing),
            areas[pred_surf.codes],
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
