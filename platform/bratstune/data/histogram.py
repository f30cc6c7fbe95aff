"""Histogram matching of brain intensities onto a reference (``PreprocessConfig.histogram_match``).

:class:`HistogramReference` holds per-channel percentile landmarks (the cohort's mean quantiles,
or one reference image's); :func:`match_histogram` maps one channel's brain voxels onto them with
a monotone piecewise-linear quantile mapping; :func:`load_reference` reads a reference file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bratstune.errors import DataError

__all__ = ["DEFAULT_LEVELS", "HistogramReference", "load_reference", "match_histogram"]

#: Percentile levels used as histogram landmarks (0, 1, ..., 100).
DEFAULT_LEVELS = np.linspace(0.0, 100.0, 101)

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
            mask = np.any(image != 0, axis=0)  # the brain: any modality non-zero
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
