"""BraTS 2025/2026 lesion-wise metrics, as the ``brats-evaluation`` package (panoptica) computes them.

Rules, per region group R:

1. Instances: 26-connected components of ``GT_R`` and of ``P_R`` (no dilation, no size threshold).
2. Matching: strictly one-to-one, maximum bipartite matching (``scipy.optimize.linear_sum_assignment``)
   on the cost ``1 − Dice(g, p)`` for every overlapping pair with ``Dice ≥ 1e-6``, other entries
   cost ``1 + 1e-6``; an assigned pair is a match when its cost is below 1. Unmatched predictions
   are false positives, unmatched GT instances false negatives.
3. Per match: Dice, HD95 (medpy/panoptica voxel-border definition, see ``surface``) and normalised
   surface Dice (tolerance = smallest voxel spacing).
4. Reported: ``lesionwise_dice`` / ``lesionwise_hd95`` / ``lesionwise_nsd`` = mean over matches
   (no match: 0 / +inf / 0 when there are instances, NaN when there are none), TP/FP/FN counts,
   precision ``TP/(TP+FP)``, recall ``TP/(TP+FN)`` (NaN on 0/0), F1 (panoptica's recognition
   quality ``TP/(TP + ½FP + ½FN)``; 0 when TP = 0 and NaN when there are no instances), and the
   whole-region Dice / HD95 (``legacy_*``: Dice 0 and HD95 373 when the masks do not overlap, NaN
   when both are empty).
5. Penalised variant (``penalised=True``, the BraTS-MET parser): each unmatched GT instance of
   volume ≥ ``min_volume`` (20 mm³) and each false positive adds Dice 0 / HD95 373; matched instances
   below ``min_volume`` are left out; NaN when the region has no GT instance of that size.

Divergence from the package, on purpose: the whole-region HD95 uses the voxel spacing (panoptica
computes its global HD95 with unit spacing whatever the spacing is); it is identical at 1 mm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from bratstune.metrics import legacy
from bratstune.metrics.compact import Layout
from bratstune.metrics.components import component_sizes, components
from bratstune.metrics.nearest import SurfaceIndex
from bratstune.metrics.surface import ComponentSurfaces, hd95_from_distances, nsd_from_distances

__all__ = ["GROUPS", "HD95_MISS", "MATCH_THRESHOLD", "evaluate_region"]

HD95_MISS = 373.0  # mm, the parser's replacement for an infinite HD95 (diagonal of the SRI-24 box)
MATCH_THRESHOLD = 1e-6  # minimum Dice of a candidate pair
_UNMATCHED_COST = 1.0 + 1e-6

# region groups of brats-evaluation 0.0.10's bundled configs, per challenge
GROUPS: Mapping[str, Mapping[str, tuple[int, ...]]] = {
    "GLI": {"NETC": (1,), "SNFH": (2,), "ET": (3,), "RC": (4,), "TC": (1, 3), "WT": (1, 2, 3)},
    "PED": {"ET": (1,), "NETC": (2,), "CC": (3,), "ED": (4,), "TC": (1, 2, 3), "WT": (1, 2, 3, 4)},
    "MET": {"ET": (3,), "RC": (4,), "TC": (1, 3), "WT": (1, 2, 3)},
    "MEN": {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)},
    "SSA": {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)},
    "GOAT": {"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)},
    "MEN-RT": {"GTV": (1,)},
}


def _mean_std(values: list[float], *, none_value: float) -> tuple[float, float]:
    if not values:
        return none_value, float("nan")
    return float(np.average(values)), float(np.std(values))


def evaluate_region(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    spacing: Sequence[float],
    penalised: bool = False,
    min_volume: float = 20.0,
    lesion_table: bool = False,
    total_voxels: int | None = None,
    layout: Layout | None = None,
) -> dict:
    """Lesion-wise metrics of one region group (boolean ``pred``/``gt`` of one shape, any crop
    that holds all their foreground; ``total_voxels``: the voxels the confusion's TN counts from,
    default the crop's; ``layout``: ``pred``/``gt`` are packed on that layout's canvas
    (``bratstune.metrics.compact``), which changes no value).

    Returns:
        dict with ``lesionwise_dice``, ``lesionwise_dice_std``, ``lesionwise_hd95``,
        ``lesionwise_hd95_std``, ``lesionwise_nsd``, ``num_tp``, ``num_fp``, ``num_fn``,
        ``precision``, ``recall``, ``f1``, ``legacy_dice``, ``legacy_hd95``, ``iou``; with
        ``penalised`` also ``lesionwise_dice_unpenalised`` / ``lesionwise_hd95_unpenalised``; and
        ``lesions`` (one row per GT instance, matched first) if asked.
    """
    spacing = tuple(float(s) for s in spacing)
    voxel_volume = spacing[0] * spacing[1] * spacing[2]
    tolerance = min(spacing)
    gt_cc, n_ref = components(gt)
    pred_cc, n_pred = components(pred)
    if layout is not None:  # the case's numbering (raster order), which the matching's ties follow
        gt_cc, pred_cc = layout.renumber(gt_cc, n_ref), layout.renumber(pred_cc, n_pred)

    gt_sizes = component_sizes(gt_cc, gt, n_ref)
    matches: list[tuple[int, int]] = []
    pair_dice: dict[tuple[int, int], float] = {}
    if n_ref and n_pred:
        both = gt & pred
        code = gt_cc[both].astype(np.int64) + pred_cc[both].astype(np.int64) * (n_ref + 1)
        size = (n_ref + 1) * (n_pred + 1)
        if size <= max(4 * code.size, 1 << 16):  # a count per possible pair: one pass, no sort
            counts = np.bincount(code, minlength=size)
            values = np.flatnonzero(counts)
            inter = counts[values]
        else:
            values, inter = np.unique(code, return_counts=True)
        pair_ref = values % (n_ref + 1)
        pair_pred = values // (n_ref + 1)
        pred_sizes = component_sizes(pred_cc, pred, n_pred)
        dice = (
            2.0
            * inter.astype(np.float64)
            / (gt_sizes[pair_ref].astype(np.float64) + pred_sizes[pair_pred].astype(np.float64))
        )
        cost = np.full((n_ref, n_pred), _UNMATCHED_COST)
        for d, r, p in zip(dice.tolist(), pair_ref.tolist(), pair_pred.tolist()):
            if d >= MATCH_THRESHOLD:
                cost[r - 1, p - 1] = 1.0 - d
                pair_dice[(r, p)] = d
        rows_idx, cols_idx = linear_sum_assignment(cost)
        matches = [(int(i) + 1, int(j) + 1) for i, j in zip(rows_idx, cols_idx) if cost[i, j] < 1.0]

    conf = legacy.confusion(pred, gt, total=total_voxels)
    surfaces_needed = bool(matches) or conf.tp > 0
    if surfaces_needed:
        gt_surf = ComponentSurfaces(gt, gt_cc, "voxel")
        pred_surf = ComponentSurfaces(pred, pred_cc, "voxel")
    rows = []
    for r, p in matches:
        g_pts, _ = gt_surf.select([r])
        p_pts, _ = pred_surf.select([p])
        to_pred = pred_surf.distances_to(g_pts, spacing, p)
        to_gt = gt_surf.distances_to(p_pts, spacing, r)
        rows.append(
            {
                "lesion": r,
                "component": p,
                "matched": True,
                "voxels": int(gt_sizes[r]),
                "volume": float(gt_sizes[r]) * voxel_volume,
                "dice": pair_dice[(r, p)],
                "hd95": hd95_from_distances(to_pred, to_gt),
                "nsd": nsd_from_distances(to_pred, to_gt, tolerance),
            }
        )
    matched_refs = {r for r, _ in matches}
    for r in range(1, n_ref + 1):
        if r not in matched_refs:
            rows.append(
                {
                    "lesion": r,
                    "component": None,
                    "matched": False,
                    "voxels": int(gt_sizes[r]),
                    "volume": float(gt_sizes[r]) * voxel_volume,
                    "dice": None,
                    "hd95": None,
                    "nsd": None,
                }
            )

    tp = len(matches)
    fp = n_pred - tp
    fn = n_ref - tp
    no_instances = n_ref + n_pred == 0
    matched_rows = [row for row in rows if row["matched"]]
    nan = float("nan")
    lw_dice, lw_dice_std = _mean_std([r["dice"] for r in matched_rows], none_value=nan if no_instances else 0.0)
    lw_hd95, lw_hd95_std = _mean_std(
        [r["hd95"] for r in matched_rows], none_value=nan if no_instances else float("inf")
    )
    lw_nsd, lw_nsd_std = _mean_std([r["nsd"] for r in matched_rows], none_value=nan if no_instances else 0.0)
    if tp == 0:
        f1 = nan if no_instances else 0.0
    else:
        f1 = tp / (tp + 0.5 * fp + 0.5 * fn)

    # whole-region metrics
    if conf.tp == 0:
        g_dice = nan if no_instances else 0.0
        g_hd95 = nan if no_instances else HD95_MISS
    else:
        g_dice = 2 * conf.tp / (conf.gt_count + conf.pred_count)
        if n_ref == 1 and n_pred == 1 and tp == 1:
            g_hd95 = rows[0]["hd95"]  # one instance each, matched: the same two masks
        else:
            g_hd95 = hd95_from_distances(*_whole_region_distances(gt_surf, pred_surf, spacing, layout))

    result = {
        "lesionwise_dice": lw_dice,
        "lesionwise_dice_std": lw_dice_std,
        "lesionwise_hd95": lw_hd95,
        "lesionwise_hd95_std": lw_hd95_std,
        "lesionwise_nsd": lw_nsd,
        "lesionwise_nsd_std": lw_nsd_std,
        "num_tp": tp,
        "num_fp": fp,
        "num_fn": fn,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "f1": f1,
        "legacy_dice": float(g_dice),
        "legacy_hd95": float(g_hd95),
        "iou": legacy.iou(conf) if not no_instances else nan,
        "gt_volume": conf.gt_count * voxel_volume,
        "pred_volume": conf.pred_count * voxel_volume,
        "confusion": conf.as_dict(),
    }
    if penalised:
        result["lesionwise_dice_unpenalised"] = lw_dice
        result["lesionwise_hd95_unpenalised"] = lw_hd95
        result["lesionwise_dice"], result["lesionwise_hd95"] = _penalised(rows, fp, n_ref, min_volume)
    if lesion_table:
        result["lesions"] = rows
    return result


def _whole_region_distances(
    gt_surf: ComponentSurfaces, pred_surf: ComponentSurfaces, spacing: tuple[float, ...], layout: Layout | None
) -> tuple[np.ndarray, np.ndarray]:
    """Border distances GT → prediction and back over the whole region (in the case's frame when
    packed: pieces lie side by side on the canvas, not where they are)."""
    if layout is None:
        return pred_surf.distances_to(gt_surf.points, spacing), gt_surf.distances_to(pred_surf.points, spacing)
    gt_points, pred_points = layout.to_case(gt_surf.points), layout.to_case(pred_surf.points)
    to_pred = SurfaceIndex(pred_points, pred_surf.ids, layout.shape, spacing).distances(gt_points)
    to_gt = SurfaceIndex(gt_points, gt_surf.ids, layout.shape, spacing).distances(pred_points)
    return to_pred, to_gt


def _penalised(rows: list[dict], fp: int, n_ref: int, min_volume: float) -> tuple[float, float]:
    """BraTS-MET parser: large GT instances (volume ≥ min_volume) and FPs, misses scored 0 / 373."""
    dices: list[float] = []
    hd95s: list[float] = []
    large_present = False
    for row in rows:
        if row["volume"] < min_volume:
            continue
        large_present = True
        if row["matched"]:
            dices.append(row["dice"])
            hd95s.append(row["hd95"])
        else:
            dices.append(0.0)
            hd95s.append(HD95_MISS)
    if n_ref == 0 or not large_present:
        return float("nan"), float("nan")
    dices.extend([0.0] * fp)
    hd95s.extend([HD95_MISS] * fp)
    finite = [h for h in hd95s if np.isfinite(h)]
    return float(np.mean(dices)), float(np.mean(finite)) if finite else HD95_MISS
