"""Preprocessing of one case: reorient, resample, crop to the brain, rescale, z-score, histogram matching.

The steps, in order, for a case loaded by :func:`bratstune.data.case.load_case`:

1. **Intensity fingerprint** of the raw brain voxels (percentiles 1/50/99 per modality, shape,
   spacing, orientation codes of the *input*) for drift checks between cohorts.
2. **Model grid** (:mod:`bratstune.data.resample`): reorient to ``orientation`` (lossless axis
   flips / permutations, default ``RAS``), then resample to ``target_spacing`` (mm) when the
   spacing differs: images cubic (Gaussian anti-aliasing on downsampled axes), the brain mask
   linear then ``>= 0.5`` (image voxels outside it are set to exactly 0), labels nearest-neighbour.
   The :class:`~bratstune.data.resample.GridMap` is kept (:attr:`PreprocessedCase.grid`) so that
   probabilities can be brought back to the input grid.
3. **Brain mask** = voxels where *any* modality is non-zero (skull-stripped BraTS data has
   exactly-zero background).
4. **Crop** to the mask's bounding box, grown by ``margin`` voxels and clipped to the volume.
   The box (in the model grid) is kept so predictions can be pasted back with :func:`uncrop`.
5. Per modality, over brain voxels only (background stays exactly 0):

   a. ``percentile_rescale=(lo, hi)``: clip to the ``lo``-th / ``hi``-th brain percentiles and
      rescale linearly to ``[0, 1]``;
   b. ``normalize="zscore"``: :math:`x \\leftarrow (x - \\mu) / \\sigma` with mean and standard
      deviation of the brain voxels (after step a when both are set);
   c. ``histogram_match``: monotone quantile mapping of the brain voxels onto a reference
      (:class:`~bratstune.data.histogram.HistogramReference`,
      :func:`~bratstune.data.histogram.match_histogram`). It runs last, so the output follows the
      reference's distribution; the reference must therefore come from images preprocessed
      with the same options (minus ``histogram_match``).

``target_spacing=None`` means "the cohort's median spacing": :func:`bratstune.data.cohort.prepare_cohort`
resolves it from the cohort's headers before anything is cached (:func:`bratstune.data.cohort.resolve_preprocess`).
A case preprocessed on its own with ``None`` keeps its own spacing (reorientation only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from bratstune.config_utils import check_choice, to_dict
from bratstune.data.case import MODALITIES
from bratstune.data.histogram import HistogramReference, load_reference, match_histogram
from bratstune.data.resample import DEFAULT_ORIENTATION, GridMap, check_orientation, plan_grid, to_model_grid
from bratstune.errors import ConfigError

if TYPE_CHECKING:
    from bratstune.data.case import CaseData

logger = logging.getLogger(__name__)

__all__ = [
    "COHORT",
    "HistogramReference",
    "NORMALIZATIONS",
    "PreprocessConfig",
    "PreprocessedCase",
    "brain_bbox",
    "brain_mask",
    "intensity_fingerprint",
    "load_reference",
    "match_histogram",
    "preprocess_case",
    "preprocess_arrays",
    "replace_config",
    "to_model_grid_arrays",
    "uncrop",
]

NORMALIZATIONS = ("zscore", "none")
#: Bump when the output of :func:`preprocess_case` changes for an unchanged config
#: (it is part of :meth:`PreprocessConfig.fingerprint`, hence of every cache key).
PREPROCESS_VERSION = 2

BBox = tuple[slice, slice, slice]
#: ``histogram_match`` value selecting the cohort's mean quantiles as the reference.
COHORT = "cohort"


@dataclass(frozen=True)
class PreprocessConfig:
    """Options of :func:`preprocess_case`; build from YAML with ``config_utils.from_dict``.

    Args:
        crop_to_brain: crop every array to the bounding box of the brain mask.
        margin: voxels added on each side of the bounding box (clipped to the volume).
        normalize: ``"zscore"`` (per modality, brain voxels only) or ``"none"``.
        percentile_rescale: ``(lo, hi)`` percentiles, e.g. ``(2, 98)``: clip the brain voxels to
            these percentiles and rescale to ``[0, 1]``. Applied *before* z-scoring when both are
            set (so it only acts as outlier clipping); use ``normalize="none"`` to keep ``[0, 1]``.
        histogram_match: ``None`` (off), ``"cohort"`` (match every case to the mean quantiles of
            the cohort, computed by :meth:`bratstune.data.cache.CaseCache.prepare`), or the path
            of a reference: a ``.json`` written by :meth:`HistogramReference.save` or a ``.npy``
            preprocessed image ``(4, X, Y, Z)`` (e.g. a cache entry's ``image.npy``). ``True`` is
            read as ``"cohort"`` and ``False`` as ``None``.
        target_spacing: voxel size ``(x, y, z)`` in mm of the model grid (axes in ``orientation``
            order), e.g. ``[2, 2, 2]``; ``None`` = the cohort's median spacing (resolved by
            :func:`bratstune.data.cohort.prepare_cohort`; a lone case keeps its own spacing).
        orientation: axis codes every case is reoriented to before resampling (``"RAS"``, as
            ``nibabel.as_closest_canonical``; ``"LPS"`` ...).
    """

    crop_to_brain: bool = True
    margin: int = 0
    normalize: str = "zscore"
    percentile_rescale: tuple[float, float] | None = None
    histogram_match: bool | str | None = None
    target_spacing: tuple[float, float, float] | None = None
    orientation: str = DEFAULT_ORIENTATION

    def __post_init__(self) -> None:
        check_choice(self.normalize, NORMALIZATIONS, "normalize")
        object.__setattr__(self, "orientation", check_orientation(self.orientation, "orientation"))
        if self.target_spacing is not None:
            spacing = tuple(self.target_spacing) if isinstance(self.target_spacing, (list, tuple)) else ()
            if len(spacing) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in spacing
            ):
                raise ConfigError(
                    f"target_spacing: expected three positive voxel sizes in mm (e.g. [2, 2, 2]) or null "
                    f"(the cohort's median), got {self.target_spacing!r}"
                )
            object.__setattr__(self, "target_spacing", tuple(float(v) for v in spacing))
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise ConfigError(f"margin: expected a non-negative integer, got {self.margin!r}")
        if self.percentile_rescale is not None:
            lo_hi = tuple(float(v) for v in self.percentile_rescale)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 100.0:
                raise ConfigError(
                    f"percentile_rescale: expected (lo, hi) with 0 <= lo < hi <= 100, got {self.percentile_rescale!r}"
                )
            object.__setattr__(self, "percentile_rescale", lo_hi)
        match = self.histogram_match
        if match is True:
            match = COHORT
        elif match is False or match == "":
            match = None
        elif match is not None:
            match = str(match)
        object.__setattr__(self, "histogram_match", match)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the options (and :data:`PREPROCESS_VERSION`)."""
        payload = json.dumps({"version": PREPROCESS_VERSION, **to_dict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class PreprocessedCase:
    """A case ready for sampling: on the model grid, cropped, normalised, channel-first.

    Attributes:
        case_id: the case's id.
        image: float32 ``(4, x, y, z)`` in ``MODALITIES`` order (may be a read-only ``np.memmap``).
        label: uint8 ``(x, y, z)`` in the case's label scheme, or ``None`` without a label.
        bbox: the crop inside the (uncropped) model grid, one ``slice`` per spatial axis.
        original_shape: spatial shape ``(X, Y, Z)`` of the uncropped model grid (the input's
            shape when neither reorientation nor resampling changed it).
        affine: 4x4 voxel-to-world matrix of the uncropped model grid.
        spacing: voxel size in mm of the arrays (the target spacing once resampled).
        fingerprint: intensity/geometry summary of the *input* before any step (see
            :func:`intensity_fingerprint`), plus ``"grid"``: ``{"spacing", "orientation"}`` of the
            model grid.
        config_fingerprint: :meth:`PreprocessConfig.fingerprint` of the options used.
        grid: how the input grid maps onto the model grid (``None``: they are the same grid);
            :func:`bratstune.data.resample.to_input_grid` brings model-grid arrays back.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    bbox: BBox
    original_shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    fingerprint: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str = ""
    grid: GridMap | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the cropped arrays."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def crop_affine(self) -> np.ndarray:
        """Voxel-to-world matrix of the cropped grid (the model grid's affine shifted by the bbox)."""
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in self.bbox]
        return np.asarray(self.affine, dtype=float) @ shift


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Brain mask of a channel-first image: any modality non-zero.

    Args:
        image: ``(C, X, Y, Z)`` array.

    Returns:
        bool ``(X, Y, Z)``.
    """
    if image.ndim != 4:
        raise ValueError(f"expected a channel-first (C, X, Y, Z) image, got shape {image.shape}")
    return np.any(image != 0, axis=0)


def brain_bbox(mask: np.ndarray, *, margin: int = 0) -> BBox:
    """Bounding box of a mask's true voxels grown by ``margin`` and clipped to the volume.

    An empty mask gives the whole volume.
    """
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    if not mask.any():
        return tuple(slice(0, int(s)) for s in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start = max(int(hits[0]) - margin, 0)
        stop = min(int(hits[-1]) + 1 + margin, mask.shape[axis])
        box.append(slice(start, stop))
    return tuple(box)  # type: ignore[return-value]


def uncrop(array: np.ndarray, bbox: Sequence[slice], original_shape: Sequence[int], *, fill: Any = 0) -> np.ndarray:
    """Paste a cropped array back into the original grid.

    Args:
        array: ``(x, y, z)`` or channel-first ``(C, x, y, z)`` array on the cropped grid.
        bbox: the crop, as in :attr:`PreprocessedCase.bbox`.
        original_shape: spatial shape ``(X, Y, Z)`` of the original grid.
        fill: value outside the box.

    Returns:
        ``(X, Y, Z)`` or ``(C, X, Y, Z)`` array with ``array``'s dtype.
    """
    original_shape = tuple(int(s) for s in original_shape)
    if len(bbox) != 3 or len(original_shape) != 3:
        raise ValueError(f"expected a 3-axis bbox and shape, got {bbox!r} and {original_shape!r}")
    box_shape = tuple(s.stop - s.start for s in bbox)
    if tuple(array.shape[-3:]) != box_shape or array.ndim not in (3, 4):
        raise ValueError(
            f"array of shape {array.shape} does not fit the bbox {box_shape}; "
            "expected (x, y, z) or (C, x, y, z) with the cropped spatial shape"
        )
    out = np.full(array.shape[:-3] + original_shape, fill, dtype=array.dtype)
    out[(Ellipsis, *bbox)] = array
    return out


def intensity_fingerprint(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    affine: np.ndarray,
    spacing: Sequence[float],
    modalities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Summary of raw intensities and geometry, used to detect drift between cohorts.

    Returns:
        ``{"shape": [X, Y, Z], "spacing": [...], "orientation": ["R", "A", "S"], "brain_voxels": n,
        "intensity": {modality: {"p1": ..., "p50": ..., "p99": ...}}}``.
    """
    names = list(modalities) if modalities is not None else [f"c{i}" for i in range(image.shape[0])]
    stats: dict[str, dict[str, float]] = {}
    for name, channel in zip(names, image):
        voxels = channel[mask]
        if voxels.size == 0:
            stats[name] = {"p1": 0.0, "p50": 0.0, "p99": 0.0}
            continue
        p1, p50, p99 = np.percentile(voxels, [1, 50, 99])
        stats[name] = {"p1": float(p1), "p50": float(p50), "p99": float(p99)}
    return {
        "shape": [int(s) for s in image.shape[1:]],
        "spacing": [float(s) for s in spacing],
        "orientation": list(nib.aff2axcodes(np.asarray(affine, dtype=float))),
        "brain_voxels": int(mask.sum()),
        "intensity": stats,
    }


# --- normalisation ------------------------------------------------------------------------


def _normalise_channel(
    channel: np.ndarray,
    mask: np.ndarray,
    config: PreprocessConfig,
    landmarks: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    out = np.zeros(channel.shape, dtype=np.float32)
    voxels = channel[mask].astype(np.float64)
    if voxels.size == 0:
        return out
    if config.percentile_rescale is not None:
        lo, hi = np.percentile(voxels, config.percentile_rescale)
        voxels = np.clip(voxels, lo, hi)
        voxels = (voxels - lo) / (hi - lo) if hi > lo else np.zeros_like(voxels)
    if config.normalize == "zscore":
        std = voxels.std()
        voxels = (voxels - voxels.mean()) / std if std > 0 else voxels - voxels.mean()
    if landmarks is not None:
        voxels = match_histogram(voxels, *landmarks)
    out[mask] = voxels.astype(np.float32)
    return out


def preprocess_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    config: PreprocessConfig,
    *,
    reference: HistogramReference | None = None,
) -> tuple[np.ndarray, np.ndarray | None, BBox]:
    """Array-level core of :func:`preprocess_case` (no geometry, no fingerprint).

    Args:
        image: ``(4, X, Y, Z)`` raw intensities.
        label: ``(X, Y, Z)`` labels or ``None``.
        config: the options.
        reference: histogram reference, required when ``config.histogram_match`` is set.

    Returns:
        ``(image (4, x, y, z) float32, label (x, y, z) uint8 or None, bbox)``.
    """
    if image.ndim != 4:
        raise ValueError(f"expected a channel-first (C, X, Y, Z) image, got shape {image.shape}")
    if label is not None and label.shape != image.shape[1:]:
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[1:]}")
    if config.histogram_match is not None and reference is None:
        raise ConfigError("histogram_match is set but no histogram reference was given")
    if reference is not None and reference.values.shape[0] != image.shape[0]:
        raise ValueError(f"histogram reference has {reference.values.shape[0]} channels, image has {image.shape[0]}")
    mask = brain_mask(image)
    bbox = (
        brain_bbox(mask, margin=config.margin) if config.crop_to_brain else tuple(slice(0, int(s)) for s in mask.shape)
    )
    image = image[(slice(None), *bbox)]
    mask = mask[bbox]
    channels = [
        _normalise_channel(
            channel, mask, config, None if reference is None else (reference.levels, reference.values[i])
        )
        for i, channel in enumerate(image)
    ]
    out_label = None if label is None else np.ascontiguousarray(label[bbox], dtype=np.uint8)
    return np.ascontiguousarray(np.stack(channels)), out_label, bbox  # type: ignore[return-value]


def to_model_grid_arrays(
    image: np.ndarray, label: np.ndarray | None, grid: GridMap
) -> tuple[np.ndarray, np.ndarray | None]:
    """Step 2 of the module docstring: ``(image (C, X', Y', Z') float32, label (X', Y', Z') or None)``.

    Images are interpolated with cubic B-splines (nnU-Net's order 3); the brain mask (any channel
    non-zero) is interpolated linearly and thresholded at 0.5, and image voxels outside it are set
    to exactly 0 so the background stays background; labels (training targets) are taken
    nearest-neighbour.
    """
    if grid.identity:
        return image, label
    if not grid.resampled:  # reorientation only: lossless, keep the dtypes
        return to_model_grid(image, grid), None if label is None else to_model_grid(label, grid, order=0)
    out = to_model_grid(image.astype(np.float32, copy=False), grid, order=3)
    inside = to_model_grid(brain_mask(image).astype(np.float32), grid, order=1) >= 0.5
    out[:, ~inside] = 0.0
    return out, None if label is None else to_model_grid(label, grid, order=0)


def preprocess_case(
    data: CaseData,
    config: PreprocessConfig,
    *,
    reference: HistogramReference | None = None,
) -> PreprocessedCase:
    """Reorient, resample, crop and normalise a loaded case (see the module docstring for the steps).

    Args:
        data: a case from :func:`bratstune.data.case.load_case`.
        config: the options.
        reference: the histogram reference for ``histogram_match="cohort"``; for a path it is
            read from ``config.histogram_match`` when not given.

    Returns:
        The :class:`PreprocessedCase` on the model grid (``grid`` maps it back to the input grid).
    """
    if reference is None and config.histogram_match not in (None, COHORT):
        reference = load_reference(config.histogram_match)
    if config.histogram_match == COHORT and reference is None:
        raise ConfigError(
            "histogram_match='cohort' needs the cohort's reference: use "
            "CaseCache.prepare(cases, config) or pass reference=HistogramReference.from_images(...)"
        )
    image = np.asarray(data.image)

    fingerprint = intensity_fingerprint(
        image,
        brain_mask(image),
        affine=data.affine,
        spacing=data.spacing,
        modalities=MODALITIES if image.shape[0] == len(MODALITIES) else None,
    )
    grid = plan_grid(image.shape[1:], data.affine, orientation=config.orientation, target_spacing=config.target_spacing)
    fingerprint["grid"] = {"spacing": [round(v, 6) for v in grid.spacing], "orientation": grid.orientation}
    on_grid, label = to_model_grid_arrays(image, data.label, grid)
    out, label, bbox = preprocess_arrays(on_grid, label, config, reference=reference)
    logger.debug(
        "preprocessed %s: %s -> model grid %s (%s) -> %s",
        data.case.case_id,
        image.shape[1:],
        grid.shape,
        "resampled" if grid.resampled else "same spacing",
        out.shape[1:],
    )
    return PreprocessedCase(
        case_id=data.case.case_id,
        image=out,
        label=label,
        bbox=bbox,
        original_shape=tuple(int(s) for s in grid.shape),  # type: ignore[arg-type]
        affine=np.asarray(grid.affine, dtype=float),
        spacing=grid.spacing,
        fingerprint=fingerprint,
        config_fingerprint=config.fingerprint(),
        grid=None if grid.identity else grid,
    )


def replace_config(config: PreprocessConfig, **changes: Any) -> PreprocessConfig:
    """``dataclasses.replace`` for :class:`PreprocessConfig` (validated again)."""
    return dataclasses.replace(config, **changes)
