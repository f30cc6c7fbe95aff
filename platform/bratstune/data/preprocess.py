"""Intensity preprocessing of one case: crop to the brain, rescale, z-score, histogram matching.

The steps, in order, for a case loaded by :func:`bratstune.data.case.load_case`:

1. **Brain mask** = voxels where *any* modality is non-zero (skull-stripped BraTS data has
   exactly-zero background).
2. **Crop** to the mask's bounding box, grown by ``margin`` voxels and clipped to the volume.
   The box (in the original voxel grid) is kept so predictions can be pasted back with
   :func:`uncrop`.
3. **Intensity fingerprint** of the raw brain voxels (percentiles 1/50/99 per modality, shape,
   spacing, orientation codes) for drift checks between cohorts.
4. Per modality, over brain voxels only (background stays exactly 0):

   a. ``percentile_rescale=(lo, hi)``: clip to the ``lo``-th / ``hi``-th brain percentiles and
      rescale linearly to ``[0, 1]``;
   b. ``normalize="zscore"``: :math:`x \\leftarrow (x - \\mu) / \\sigma` with mean and standard
      deviation of the brain voxels (after step a when both are set);
   c. ``histogram_match``: monotone quantile mapping of the brain voxels onto a reference
      (:class:`HistogramReference`, :func:`match_histogram`). It runs last, so the output follows the
      reference's distribution; the reference must therefore come from images preprocessed
      with the same options (minus ``histogram_match``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from bratstune.config_utils import check_choice, to_dict
from bratstune.data.case import MODALITIES
from bratstune.errors import ConfigError, DataError

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
    "uncrop",
]

NORMALIZATIONS = ("zscore", "none")
#: Bump when the output of :func:`preprocess_case` changes for an unchanged config
#: (it is part of :meth:`PreprocessConfig.fingerprint`, hence of every cache key).
PREPROCESS_VERSION = 1

BBox = tuple[slice, slice, slice]
#: ``histogram_match`` value selecting the cohort's mean quantiles as the reference.
COHORT = "cohort"
#: Percentile levels used as histogram landmarks (0, 1, ..., 100).
DEFAULT_LEVELS = np.linspace(0.0, 100.0, 101)


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
    """

    crop_to_brain: bool = True
    margin: int = 0
    normalize: str = "zscore"
    percentile_rescale: tuple[float, float] | None = None
    histogram_match: bool | str | None = None

    def __post_init__(self) -> None:
        check_choice(self.normalize, NORMALIZATIONS, "normalize")
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
    """A case ready for sampling: cropped, normalised, channel-first.

    Attributes:
        case_id: the case's id.
        image: float32 ``(4, x, y, z)`` in ``MODALITIES`` order (may be a read-only ``np.memmap``).
        label: uint8 ``(x, y, z)`` in the case's label scheme, or ``None`` without a label.
        bbox: the crop inside the original voxel grid, one ``slice`` per spatial axis.
        original_shape: spatial shape ``(X, Y, Z)`` of the input volumes.
        affine: 4x4 voxel-to-world matrix of the *original* grid.
        spacing: voxel size in mm.
        fingerprint: intensity/geometry summary before normalisation (see
            :func:`intensity_fingerprint`).
        config_fingerprint: :meth:`PreprocessConfig.fingerprint` of the options used.
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

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape of the cropped arrays."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def crop_affine(self) -> np.ndarray:
        """Voxel-to-world matrix of the cropped grid (the original affine shifted by the bbox)."""
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


# --- histogram matching -------------------------------------------------------------------
# Written here on purpose: skimage.exposure.match_histograms matches whole arrays (it cannot
# restrict to a brain mask and is not a dependency), and TorchIO's HistogramStandardization
# trains Nyul landmarks from image files into a 0-100 scale inside its Subject pipeline. A
# mask-aware quantile mapping on numpy arrays is a few lines of np.percentile + np.interp.


@dataclass(frozen=True)
class HistogramReference:
    """Per-channel intensity landmarks to match brain histograms onto.

    Attributes:
        levels: percentile levels ``(L,)``, increasing, in ``[0, 100]``.
        values: ``(C, L)`` intensities at those percentiles, non-decreasing along ``L``.
    """

    levels: np.ndarray
    values: np.ndarray

    def __post_init__(self) -> None:
        levels = np.asarray(self.levels, dtype=np.float64)
        values = np.atleast_2d(np.asarray(self.values, dtype=np.float64))
        if levels.ndim != 1 or values.shape[-1] != levels.size or levels.size < 2:
            raise ValueError(
                f"expected levels (L,) and values (C, L) with L >= 2, got {levels.shape} and {values.shape}"
            )
        if np.any(np.diff(levels) <= 0) or np.any(np.diff(values, axis=1) < 0):
            raise ValueError("histogram reference levels must increase and values must not decrease")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "values", values)

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray], *, levels: np.ndarray | None = None) -> HistogramReference:
        """Mean brain-voxel landmarks of preprocessed images ``(C, X, Y, Z)`` (brain = any channel != 0)."""
        levels = DEFAULT_LEVELS if levels is None else np.asarray(levels, dtype=np.float64)
        per_image = []
        for image in images:
            image = np.asarray(image)
            mask = brain_mask(image)
            if not mask.any():
                continue
            per_image.append([np.percentile(channel[mask], levels) for channel in image])
        if not per_image:
            raise ValueError("cannot build a histogram reference: no image has brain voxels")
        return cls(levels, np.mean(np.asarray(per_image, dtype=np.float64), axis=0))

    def digest(self) -> str:
        """Short hash of the landmarks (part of cache keys)."""
        blob = np.ascontiguousarray(np.concatenate([self.levels[None], self.values])).tobytes()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the landmarks as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"levels": self.levels.tolist(), "values": self.values.tolist()}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> HistogramReference:
        """Read landmarks written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(np.asarray(data["levels"]), np.asarray(data["values"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(path, f"not a histogram reference ({exc})") from None


def load_reference(path: str | Path) -> HistogramReference:
    """Read a reference: ``.json`` landmarks or a ``.npy`` preprocessed image ``(C, X, Y, Z)``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            path,
            "histogram reference not found; give a .json written by "
            "HistogramReference.save or a preprocessed image .npy, or use 'cohort'",
        )
    if path.suffix == ".npy":
        image = np.load(path, mmap_mode="r")
        if image.ndim != 4:
            raise DataError(path, f"expected a (C, X, Y, Z) image, got shape {image.shape}")
        return HistogramReference.from_images([image])
    return HistogramReference.load(path)


def match_histogram(values: np.ndarray, levels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map ``values`` so that their quantiles at ``levels`` become ``reference``.

    Piecewise-linear between landmarks (``np.interp``), monotone, so the order of voxels is kept;
    with levels 0 and 100 the output range is exactly the reference's range.

    Args:
        values: 1-D intensities (e.g. the brain voxels of one modality).
        levels: percentile levels ``(L,)``.
        reference: target intensities at ``levels``, ``(L,)``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    source = np.percentile(values, levels)
    # np.interp needs increasing landmarks: keep the first of tied source landmarks.
    source, keep = np.unique(source, return_index=True)
    target = np.asarray(reference, dtype=np.float64)[keep]
    if source.size == 1:
        return np.full_like(values, target.mean())
    return np.interp(values, source, target)


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


def preprocess_case(
    data: CaseData,
    config: PreprocessConfig,
    *,
    reference: HistogramReference | None = None,
) -> PreprocessedCase:
    """Crop and normalise a loaded case (see the module docstring for the steps).

    Args:
        data: a case from :func:`bratstune.data.case.load_case`.
        config: the options.
        reference: the histogram reference for ``histogram_match="cohort"``; for a path it is
            read from ``config.histogram_match`` when not given.

    Returns:
        The :class:`PreprocessedCase`.
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
    out, label, bbox = preprocess_arrays(image, data.label, config, reference=reference)
    logger.debug("preprocessed %s: %s -> %s", data.case.case_id, image.shape[1:], out.shape[1:])
    return PreprocessedCase(
        case_id=data.case.case_id,
        image=out,
        label=label,
        bbox=bbox,
        original_shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        affine=np.asarray(data.affine, dtype=float),
        spacing=tuple(float(s) for s in data.spacing),  # type: ignore[arg-type]
        fingerprint=fingerprint,
        config_fingerprint=config.fingerprint(),
    )


def replace_config(config: PreprocessConfig, **changes: Any) -> PreprocessConfig:
    """``dataclasses.replace`` for :class:`PreprocessConfig` (validated again)."""
    return dataclasses.replace(config, **changes)
