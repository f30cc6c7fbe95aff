"""``lesion_wise``: all regions of one case under a named BraTS evaluation protocol.

Protocols (``PROTOCOLS``):

``brats2023``
    The BraTS 2023 lesion-wise rules (GT lesions merged by dilation, many-to-one matching, size
    threshold, 374 mm penalty, DeepMind HD95); see ``bratstune.metrics.brats2023``.
``brats2026``
    The current BraTS evaluation (``brats-evaluation`` 0.0.10 on panoptica 2.1.7): connected
    components, one-to-one bipartite matching on Dice, medpy HD95; see ``bratstune.metrics.brats2026``.

Speed: the case is first cropped to the box of all its foreground (plus the margin the dilation
needs); inside, each region's surface is extracted once and split by component, and distances come
from a grid-shell search around each surface point, so the cost grows with the tumour's surface,
not with the 240×240×155 volume. ``brats2026`` then packs the boxes of the foreground side by side
(``bratstune.metrics.compact``), since scattered dust makes the box of all foreground nearly the
volume. Many predictions of one case (a decode search): :class:`LesionReference` prepares the
reference once. Every path gives the same values (``tests/metrics/test_reuse_paths.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bratstune.config_utils import suggest
from bratstune.metrics import brats2023, brats2026
from bratstune.metrics.compact import Layout
from bratstune.metrics.components import case_box, region_mask
from bratstune.metrics.nearest import exact_grid

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "REGION_NAMES", "LesionReference", "challenges", "lesion_wise", "protocol_regions"]

PROTOCOLS: tuple[str, ...] = ("brats2023", "brats2026")
REGION_NAMES: tuple[str, ...] = ("WT", "TC", "ET", "NETC", "SNFH", "RC", "CC", "ED", "GTV")
_ALIASES = {"GOAT": "GOAT", "MENRT": "MEN-RT", "MEN_RT": "MEN-RT", "MEN-RT": "MEN-RT"}


def _norm_challenge(challenge: str) -> str:
    name = str(challenge).strip().upper()
    if name.startswith("BRATS-"):
        name = name[len("BRATS-") :]
    return _ALIASES.get(name, name)


def challenges(protocol: str) -> tuple[str, ...]:
    """Challenge names a protocol knows, e.g. ``("GLI", "SSA", "MEN", "PED", "MET")``."""
    _check_protocol(protocol)
    if protocol == "brats2023":
        return tuple(brats2023.CHALLENGE_RULES)
    return tuple(brats2026.GROUPS)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"unknown protocol {protocol!r}{suggest(str(protocol), PROTOCOLS)}; expected one of {', '.join(PROTOCOLS)}"
        )


def _check_challenge(challenge: str, protocol: str) -> str:
    name = _norm_challenge(challenge)
    known = challenges(protocol)
    if name not in known:
        raise ValueError(
            f"unknown challenge {challenge!r} for protocol {protocol!r}; expected one of {', '.join(known)}"
        )
    return name


def protocol_regions(challenge: str, protocol: str = "brats2023") -> dict[str, tuple[int, ...]]:
    """Region name → label values evaluated by ``protocol`` for ``challenge``."""
    _check_protocol(protocol)
    name = _check_challenge(challenge, protocol)
    if protocol == "brats2023":
        return dict(brats2023.REGIONS)
    return dict(brats2026.GROUPS[name])


def _as_labels(array: Any, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"{what} must be a 3-D label volume (X, Y, Z), got shape {a.shape}")
    if a.dtype == bool:
        return np.ascontiguousarray(a, dtype=np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.array_equal(a, np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{what} must hold integer labels, got dtype {a.dtype} with fractional values")
    if a.size and a.min() < 0:
        raise ValueError(f"{what} has negative labels (min {a.min()}); labels must be >= 0")
    if a.dtype != np.uint8 and (a.size == 0 or a.max() < 256):
        a = a.astype(np.uint8)
    return np.ascontiguousarray(a)


def lesion_wise(
    pred: np.ndarray,
    gt: np.ndarray,
    challenge: str,
    protocol: str = "brats2023",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    lesions: bool = False,
    penalised: bool = False,
    regions: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Lesion-wise and legacy metrics of every region of one case.

    Args:
        pred: predicted labels ``(X, Y, Z)`` in the challenge's label scheme.
        gt: ground-truth labels, same shape.
        challenge: ``"GLI"``, ``"SSA"``, ``"MEN"``, ``"MET"``, ``"PED"`` (``brats2026`` also
            ``"GOAT"``, ``"MEN-RT"``); a ``"BraTS-"`` prefix and any case are accepted.
        protocol: ``"brats2023"`` or ``"brats2026"``.
        spacing: voxel size in mm.
        lesions: add a per-lesion table under ``"lesions"`` in each region.
        penalised: ``brats2026`` only: the BraTS-MET penalised lesion-wise Dice/HD95.
        regions: override the protocol's regions (name → label values).

    Returns:
        ``{REGION: {"lesionwise_dice", "lesionwise_hd95", "legacy_dice", "legacy_hd95", "num_tp",
        "num_fp", "num_fn", ...}}`` with region names in capitals.

    Raises:
        ValueError: bad shapes, non-integer or negative labels, unknown protocol/challenge, a
            non-positive spacing, or (``brats2026``) labels that no region of the challenge uses.
    """
    _check_protocol(protocol)
    name = _check_challenge(challenge, protocol)
    pred_l = _as_labels(pred, "pred")
    gt_l = _as_labels(gt, "gt")
    if pred_l.shape != gt_l.shape:
        raise ValueError(f"pred and gt must have one shape, got {pred_l.shape} and {gt_l.shape}")
    spacing_t = _check_spacing(spacing)
    if penalised and protocol != "brats2026":
        raise ValueError("penalised=True is the brats2026 BraTS-MET variant; use protocol='brats2026'")
    region_table = _region_table(regions) if regions is not None else protocol_regions(name, protocol)

    if protocol == "brats2023":
        rule = brats2023.CHALLENGE_RULES[name]
        margin = rule.dilation + 1
    else:
        margin = 1
    box = case_box(pred_l, gt_l, margin)
    if box is None:  # both empty: any 1-voxel crop evaluates the same
        box = (slice(0, 1), slice(0, 1), slice(0, 1))
    pred_c = np.ascontiguousarray(pred_l[box])
    gt_c = np.ascontiguousarray(gt_l[box])
    box_shape = pred_c.shape
    if protocol == "brats2026" and regions is None:
        _check_known_labels(pred_c, gt_c, region_table, name)

    out: dict[str, dict[str, Any]] = {}
    layout = None
    if protocol == "brats2026":
        # the foreground's boxes packed on a small canvas (``compact``): same values, smaller passes
        # (on an exact grid only, where moving points changes no distance: see ``nearest``)
        layout = Layout((pred_c != 0) | (gt_c != 0)) if exact_grid(spacing_t, box_shape) else None
        if layout is not None and layout.worthwhile and not any(0 in values for values in region_table.values()):
            pred_c, gt_c = layout.pack(pred_c), layout.pack(gt_c)
        else:
            layout = None
    total = pred_l.size if protocol == "brats2023" else int(np.prod(box_shape))
    for region, values in region_table.items():
        p = region_mask(pred_c, values)
        g = region_mask(gt_c, values)
        if protocol == "brats2023":
            out[region] = brats2023.evaluate_region(
                p, g, rule=rule, spacing=spacing_t, total_voxels=total, lesion_table=lesions
            )
        else:
            out[region] = brats2026.evaluate_region(
                p, g, spacing=spacing_t, penalised=penalised, lesion_table=lesions, total_voxels=total, layout=layout
            )
    return out


class LesionReference:
    """One case's reference under the ``brats2023`` protocol, prepared once to score many predictions.

    ``LesionReference(gt, challenge, spacing).evaluate(pred)`` equals
    ``lesion_wise(pred, gt, challenge, "brats2023", spacing)``, value for value; what depends only
    on the reference (the dilation-merged lesions, their sizes and surfaces, per region) is computed
    here once (``bratstune.metrics.brats2023.Reference``), which is what a decode search scoring
    hundreds of configurations of one case needs.

    Args:
        gt: ground-truth labels ``(X, Y, Z)``: the *frame*, the whole case or a crop of it that
            holds the reference plus ``dilation + 1`` voxels of margin (or reaches the volume's edge)
            and every voxel a prediction may label.
        challenge, spacing, regions: as for :func:`lesion_wise`.
        total_voxels: voxels of the whole case (for specificity) when ``gt`` is a crop.
    """

    def __init__(
        self,
        gt: np.ndarray,
        challenge: str,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        regions: Mapping[str, Sequence[int]] | None = None,
        total_voxels: int | None = None,
    ) -> None:
        name = _check_challenge(challenge, "brats2023")
        gt_l = _as_labels(gt, "gt")
        spacing_t = _check_spacing(spacing)
        self.rule = brats2023.CHALLENGE_RULES[name]
        self.shape = gt_l.shape
        self.total_voxels = gt_l.size if total_voxels is None else int(total_voxels)
        table = _region_table(regions) if regions is not None else protocol_regions(name, "brats2023")
        self.regions = table
        self.references = {
            region: brats2023.Reference(
                region_mask(gt_l, values), rule=self.rule, spacing=spacing_t, distance_maps=True
            )
            for region, values in table.items()
        }

    def evaluate(
        self,
        pred: np.ndarray,
        box: Sequence[slice] | None = None,
        *,
        lesions: bool = False,
        whole_region: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Every region's metrics of one prediction, as :func:`lesion_wise` returns them.

        Args:
            pred: predicted labels: the whole frame, or only the part inside ``box`` (everything
                outside is background); ``box`` must hold the dilated reference of every region.
            lesions: add the per-lesion tables.
            whole_region: compute ``legacy_hd95`` (leave it out to save its surface distances).
        """
        pred_l = _as_labels(pred, "pred")
        if box is None and pred_l.shape != self.shape:
            raise ValueError(f"pred and gt must have one shape, got {pred_l.shape} and {self.shape}")
        return {
            region: reference.evaluate(
                region_mask(pred_l, self.regions[region]),
                box,
                total_voxels=self.total_voxels,
                lesion_table=lesions,
                whole_region=whole_region,
            )
            for region, reference in self.references.items()
        }


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != 3 or min(spacing_t) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    return spacing_t  # type: ignore[return-value]


def _region_table(regions: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    return {k.upper(): tuple(int(v) for v in vals) for k, vals in regions.items()}


def _check_known_labels(pred: np.ndarray, gt: np.ndarray, regions: Mapping[str, Sequence[int]], challenge: str) -> None:
    known = {0} | {int(v) for vals in regions.values() for v in vals}
    for what, seg in (("pred", pred), ("gt", gt)):
        if known == set(range(max(known) + 1)) and int(seg.max(initial=0)) <= max(known):
            continue  # labels 0..max all known: one max() pass suffices
        present = np.flatnonzero(np.bincount(seg.ravel(), minlength=1)) if seg.dtype == np.uint8 else np.unique(seg)
        unknown = sorted(int(v) for v in present if int(v) not in known)
        if unknown:
            raise ValueError(
                f"{what} has labels {unknown} that no brats2026 region of {challenge} uses "
                f"(known: {sorted(known)}); convert the labels to the challenge's scheme first"
            )
