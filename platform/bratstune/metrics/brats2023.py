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
from bratstune.metrics.components import Box, component_sizes, components, dilate, expand, union_box
from bratstune.metrics.nearest import exact_grid
from bratstune.metrics.surface import ComponentSurfaces, SurfaceDistances, bounding_box
from bratstune.metrics.surfel_table import surfel_area_table

__all__ = ["CHALLENGE_RULES", "HD95_MISS", "REGIONS", "Reference", "Rule", "evaluate_region"]

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
    box, lesions_box, reach_box, n = _lesions_in_box(gt, dilation)
    lesions = np.zeros(gt.shape, dtype=np.uint32)
    reach = np.zeros(gt.shape, dtype=np.uint32)
    lesions[box] = lesions_box
    reach[box] = reach_box
    return lesions, reach, n


def _lesions_in_box(gt: np.ndarray, dilation: int) -> tuple[Box, np.ndarray, np.ndarray, int]:
    """``_lesions`` inside ``box`` = the GT's box grown by ``dilation + 1`` (both are 0 outside it)."""
    box = bounding_box(gt)
    if box is None:
        box = (slice(0, 0),) * 3
        empty = np.zeros((0, 0, 0), dtype=np.uint32)
        return box, empty, empty, 0
    box = expand(box, dilation + 1, gt.shape)
    gt_box = gt[box]
    reach, n = components(dilate(gt_box, dilation))
    lesions = np.where(gt_box, reach, 0).astype(np.uint32, copy=False)
    return box, lesions, reach, n


class Reference:
    """The ground-truth side of one region, prepared once to score many predictions against it.

    Holds what depends only on the reference: the dilation-merged lesions and their components
    ``reach`` (see ``_lesions``), lesion sizes, the voxel count and the surfel surface of every
    lesion, whose nearest-point index (and its k-d trees) is then built once and reused by every
    prediction. ``evaluate_region(pred, gt, ...)`` is ``Reference(gt, ...).evaluate(pred, ...)``;
    a decode search keeps one per case and region.

    Args:
        gt: boolean ``(X, Y, Z)``, the region in the ground truth: the *frame*; a crop of the case
            is fine when it holds all the reference plus ``rule.dilation + 1`` voxels of margin (or
            reaches the volume's edge) and every voxel any prediction may set.
        rule: dilation and minimum lesion volume.
        spacing: voxel size (mm).
        distance_maps: answer distances to a lesion's surface from a distance map built on first
            need (``bratstune.metrics.nearest``; same values), which pays off over many predictions.
    """

    def __init__(self, gt: np.ndarray, *, rule: Rule, spacing: Sequence[float], distance_maps: bool = False) -> None:
        gt = np.ascontiguousarray(gt, dtype=bool)
        self.shape = tuple(int(n) for n in gt.shape)
        self.rule = rule
        self.spacing = tuple(float(s) for s in spacing)
        # everything below is 0 outside ``box`` (the GT's box grown by the dilation + 1), so it is
        # kept inside it: a few lesions, not a frame of zeros
        self.box, self.lesions, self.reach, self.n_lesions = _lesions_in_box(gt, rule.dilation)
        self.gt = np.ascontiguousarray(gt[self.box])
        self.sizes = np.bincount(self.lesions[self.gt], minlength=self.n_lesions + 1)
        self.count = int(np.count_nonzero(self.gt))
        origin = tuple(s.start for s in self.box)
        frame = tuple(n + 1 for n in self.shape)  # surfel corners of the whole frame
        self.surfaces = (
            ComponentSurfaces(self.gt, self.lesions, "surfel", origin=origin, frame=frame, maps=distance_maps)
            if self.n_lesions
            else None
        )
        self.areas = surfel_area_table(self.spacing)
        self.exact = exact_grid(self.spacing, frame)  # distances on it are sqrt(k / 256) exactly

    def evaluate(
        self,
        pred: np.ndarray,
        box: Sequence[slice] | None = None,
        *,
        total_voxels: int | None = None,
        lesion_table: bool = False,
        whole_region: bool = True,
    ) -> dict:
        """Lesion-wise and legacy metrics of a prediction (see :func:`evaluate_region`).

        Args:
            pred: boolean prediction of the region: the whole frame, or the part inside ``box``
                (everything outside it is background).
            box: where ``pred`` lies in the frame; it must contain ``self.box`` (every dilated
                lesion). ``None``: ``pred`` is the whole frame.
            total_voxels: voxels of the whole volume (for specificity); default the frame's
                (``pred.size`` without a box).
            lesion_table: also return ``"lesions"``.
            whole_region: compute ``legacy_hd95`` (left out when ``False``: a search that needs
                only the lesion-wise values saves its surface distances).
        """
        if box is None:
            box = tuple(slice(0, n) for n in self.shape)
            if pred.shape != self.shape:
                raise ValueError(f"pred and gt must have one shape, got {pred.shape} and {self.shape}")
        else:
            box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, self.shape))
            if pred.shape != tuple(s.stop - s.start for s in box):
                raise ValueError(f"pred of shape {pred.shape} does not fill the box {box}")
            if self.n_lesions and any(b.start > r.start or b.stop < r.stop for b, r in zip(box, self.box)):
                raise ValueError(f"box {box} does not hold the dilated reference {self.box}")
        pred, box = self._tighten(pred, box)
        origin = np.array([s.start for s in box], dtype=np.int64)
        # the reference's part of the prediction (its box inside ``box``)
        inner = (
            tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(self.box, box))
            if self.n_lesions
            else (slice(0, 0),) * 3
        )
        gt, lesions, reach, n_lesions = self.gt, self.lesions, self.reach, self.n_lesions
        spacing = self.spacing
        rule = self.rule
        voxel_volume = _voxel_volume(spacing)
        tp = int(np.count_nonzero(pred[inner] & gt)) if n_lesions else 0
        n_pred_voxels = int(np.count_nonzero(pred))
        size = int(np.prod(self.shape)) if total_voxels is None else int(total_voxels)
        conf = legacy.Confusion(
            tp=tp, fp=n_pred_voxels - tp, fn=self.count - tp, tn=size - (n_pred_voxels + self.count - tp)
        )

        pred_cc, n_pred = components(pred)
        pred_sizes = component_sizes(pred_cc, pred, n_pred)
        gt_sizes = self.sizes
        # every predicted voxel on a lesion voxel belongs to a component that touches the dilated
        # lesion, so |L ∩ U| is just the lesion's overlap with the prediction
        inter = np.bincount(lesions[gt & pred[inner]], minlength=n_lesions + 1)
        # components touching each dilated lesion: (lesion, component) pairs over the dilated voxels
        pred_cc_inner = pred_cc[inner]
        touching = (reach != 0) & (pred_cc_inner != 0)
        pairs = _distinct(reach[touching].astype(np.int64) * (n_pred + 1) + pred_cc_inner[touching], n_lesions, n_pred)
        pair_lesion, pair_pred = pairs // (n_pred + 1), pairs % (n_pred + 1)
        hits_of = np.split(pair_pred, np.searchsorted(pair_lesion, np.arange(2, n_lesions + 1)))

        # surfaces: the reference's in frame coordinates, the prediction's in the box's (corner c of
        # the box is corner c + origin of the frame)
        gt_surf = self.surfaces
        pred_surf = ComponentSurfaces(pred, pred_cc, "surfel") if n_pred else None

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
                hd95 = SurfaceDistances.from_codes(
                    pred_surf.distances_to(g_pts - origin, spacing, select),
                    g_codes,
                    gt_surf.distances_to(p_pts + origin, spacing, lesion_id),
                    p_codes,
                    spacing,
                    exact=self.exact,
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

        result = {
            "lesionwise_dice": float(lw_dice),
            "lesionwise_hd95": float(lw_hd95),
            "legacy_dice": legacy.dice(conf),
        }
        if whole_region:
            result["legacy_hd95"] = float(self._whole_region_hd95(conf, rows, n_fp, pred_surf, origin))
        result.update(
            {
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
        )
        if lesion_table:
            result["lesions"] = rows
        return result

    def _tighten(self, pred: np.ndarray, box: Box) -> tuple[np.ndarray, Box]:
        """``pred`` cut to the box of its own voxels and the dilated reference (every step below
        gives the same result in any box that holds both; a region is often much smaller than the
        box of the whole case). Only on an exact grid: elsewhere a k-d tree's choice among equally
        near points may depend on where the points sit, and the frame stays the caller's."""
        if not self.exact:
            return pred, box
        own = bounding_box(pred)
        boxes = [] if own is None else [tuple(slice(o.start + b.start, o.stop + b.start) for o, b in zip(own, box))]
        if self.n_lesions:
            boxes.append(self.box)
        if not boxes:
            return pred, box
        tight = union_box(boxes)
        inner = tuple(slice(t.start - b.start, t.stop - b.start) for t, b in zip(tight, box))
        return pred[inner], tight

    def _whole_region_hd95(self, conf, rows, n_fp: int, pred_surf, origin: np.ndarray) -> float:
        """Legacy whole-region HD95 (0 if both empty, 374 if one is)."""
        if conf.pred_count == 0 and conf.gt_count == 0:
            return 0.0
        if conf.pred_count == 0 or conf.gt_count == 0:
            return HD95_MISS
        if self.n_lesions == 1 and n_fp == 0:
            return rows[0]["hd95"]  # the one lesion and its match are the whole region
        gt_surf = self.surfaces
        return SurfaceDistances(
            pred_surf.distances_to(gt_surf.points - origin, self.spacing),
            self.areas[gt_surf.codes],
            gt_surf.distances_to(pred_surf.points + origin, self.spacing),
            self.areas[pred_surf.codes],
        ).robust_hausdorff(95.0)


def _distinct(codes: np.ndarray, n_lesions: int, n_pred: int) -> np.ndarray:
    """``np.unique(codes)`` for pair codes ``lesion·(n_pred + 1) + component``: a count per possible
    pair when there are few (one pass, no sort), else the sort."""
    size = (n_lesions + 1) * (n_pred + 1)
    if size <= max(4 * codes.size, 1 << 16):
        return np.flatnonzero(np.bincount(codes, minlength=size))
    return np.unique(codes)


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
        ``lesions`` if asked. Many predictions of one reference: :class:`Reference`.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have one shape, got {pred.shape} and {gt.shape}")
    reference = Reference(gt, rule=rule, spacing=spacing)
    return reference.evaluate(
        pred, total_voxels=pred.size if total_voxels is None else total_voxels, lesion_table=lesion_table
    )
