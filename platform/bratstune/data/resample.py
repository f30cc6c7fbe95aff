"""Geometry of a case on the model's grid: reorient to one orientation, resample to one spacing.

A model sees every case in one orientation and at one voxel size (nnU-Net's "target spacing").
:func:`plan_grid` describes how a case's input grid maps onto that *model grid* as a
:class:`GridMap`; :func:`to_model_grid` moves arrays there (images linear, labels nearest) and
:func:`to_input_grid` brings arrays on the model grid (probabilities, linear) back, onto the
input's exact voxel grid. Two steps, each invertible:

1. **Reorientation** (lossless): the axes are permuted and flipped so that the voxel axes point
   along ``orientation`` (default ``"RAS"``: what ``nibabel.as_closest_canonical`` gives). It uses
   nibabel's orientation transforms (``io_orientation``, ``ornt_transform``, ``apply_orientation``),
   so a left-right flipped copy of a case lands on exactly the same array.
2. **Resampling** to ``target_spacing`` (mm), only when the reoriented spacing differs from it by
   more than :data:`SPACING_RTOL`. The model grid keeps the field of view centred, with
   ``n_t = max(1, round(n * s / t))`` voxels of exactly ``t`` mm along each axis (voxel size
   ``s``, ``n`` voxels)::

       i = (j - (n_t - 1) / 2) * r + (n - 1) / 2,      r = t / s

   maps model voxel ``j`` to (fractional) reoriented voxel ``i``; the model grid's affine is the
   reoriented affine times that map, so world coordinates are exact. Interpolation is
   ``scipy.ndimage.affine_transform`` with a diagonal matrix (separable, no full 3x3 matrix):
   cubic B-spline (order 3, as nnU-Net) for images, after a Gaussian anti-aliasing filter of
   ``sigma = (r - 1) / 2`` voxels on axes that are downsampled (as ``skimage.transform.resize``
   does); linear (order 1) for masks and, on the way back, for probabilities (a convex
   combination: they stay in ``[0, 1]``); nearest (order 0) for label maps.

Written on scipy rather than MONAI ``Spacing`` / TorchIO ``Resample``: those resample into a
grid they choose (and need torch tensors or a ``Subject``); here the way back must land on the
input's exact shape and affine, which :func:`to_input_grid` does with the inverse of the same map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage

from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ORIENTATION",
    "SPACING_RTOL",
    "GridMap",
    "check_orientation",
    "median_spacing",
    "plan_grid",
    "reoriented_spacing",
    "resample_world",
    "to_input_grid",
    "to_model_grid",
]

#: The canonical orientation every case is brought to (nibabel's ``as_closest_canonical``).
DEFAULT_ORIENTATION = "RAS"
#: Relative difference below which a spacing counts as equal to the target (no resampling).
SPACING_RTOL = 1e-3
_AXIS_CODES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


def check_orientation(value: Any, what: str = "orientation") -> str:
    """Upper-case three-letter axis codes naming each of R/L, A/P and S/I once (``"RAS"``, ``"LPS"``)."""
    text = str(value).upper()
    if len(text) != 3 or sorted(_axis_of(c) for c in text) != [0, 1, 2]:
        raise ConfigError(
            f"{what}: expected three axis codes with one of R/L, A/P and S/I each (e.g. 'RAS', 'LPS'), got {value!r}"
        )
    return text


def _axis_of(code: str) -> int:
    for axis, codes in enumerate(_AXIS_CODES):
        if code in codes:
            return axis
    return -1


@dataclass(frozen=True)
class GridMap:
    """How an input grid maps onto the model grid (see the module docstring).

    Attributes:
        input_shape: spatial shape ``(X, Y, Z)`` of the input volumes.
        input_affine: their 4x4 voxel-to-world matrix.
        ornt: nibabel orientation transform ``(3, 2)`` from the input axes to ``orientation``.
        orientation: axis codes of the model grid (``"RAS"``).
        shape: spatial shape of the model grid.
        affine: its voxel-to-world matrix.
        resampled: whether step 2 (resampling) applies; ``False``: the model grid is the
            reoriented input grid, voxel for voxel.
    """

    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    ornt: np.ndarray
    orientation: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    resampled: bool

    @property
    def reoriented_shape(self) -> tuple[int, int, int]:
        """Shape of the input grid after step 1 (reorientation only)."""
        return _permuted(self.input_shape, self.ornt)  # type: ignore[return-value]

    @property
    def reoriented_affine(self) -> np.ndarray:
        """Affine of the input grid after step 1."""
        return np.asarray(self.input_affine, dtype=float) @ nib.orientations.inv_ornt_aff(self.ornt, self.input_shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the model grid."""
        return tuple(float(v) for v in voxel_sizes(self.affine))  # type: ignore[return-value]

    @property
    def input_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the input grid, in the input's axis order."""
        sizes = voxel_sizes(np.asarray(self.input_affine, dtype=float))
        return tuple(float(v) for v in sizes)  # type: ignore[return-value]

    @property
    def identity(self) -> bool:
        """True when the model grid *is* the input grid (no flip, no permutation, no resampling)."""
        return not self.resampled and bool(np.array_equal(self.ornt, _IDENTITY_ORNT))

    def _scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(r, offset)`` with ``i = r * j + offset`` (model voxel ``j`` -> reoriented voxel ``i``)."""
        n_in = np.asarray(self.reoriented_shape, dtype=float)
        n_t = np.asarray(self.shape, dtype=float)
        r = voxel_sizes(self.affine) / voxel_sizes(self.reoriented_affine)
        return r, (n_in - 1) / 2 - (n_t - 1) / 2 * r

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (cache ``meta.json``); :meth:`from_dict` reads it back."""
        return {
            "input_shape": list(self.input_shape),
            "input_affine": np.asarray(self.input_affine, dtype=float).tolist(),
            "ornt": np.asarray(self.ornt, dtype=float).tolist(),
            "orientation": self.orientation,
            "shape": list(self.shape),
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "resampled": bool(self.resampled),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridMap:
        return cls(
            input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[arg-type]
            input_affine=np.asarray(data["input_affine"], dtype=float),
            ornt=np.asarray(data["ornt"], dtype=float),
            orientation=str(data["orientation"]),
            shape=tuple(int(v) for v in data["shape"]),  # type: ignore[arg-type]
            affine=np.asarray(data["affine"], dtype=float),
            resampled=bool(data["resampled"]),
        )


_IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


def _permuted(values: Sequence[Any], ornt: np.ndarray) -> tuple[Any, ...]:
    """``values`` per input axis, in the output axis order of ``ornt`` (input axis ``i`` -> ``ornt[i, 0]``)."""
    out: list[Any] = [None] * len(values)
    for axis, value in enumerate(values):
        out[int(ornt[axis, 0])] = value
    return tuple(out)


def _ornt(affine: np.ndarray, orientation: str) -> np.ndarray:
    src = nib.orientations.io_orientation(np.asarray(affine, dtype=float))
    return nib.orientations.ornt_transform(src, nib.orientations.axcodes2ornt(tuple(orientation)))


def reoriented_spacing(affine: np.ndarray, orientation: str = DEFAULT_ORIENTATION) -> tuple[float, float, float]:
    """Voxel size of a grid with ``affine`` after reorientation to ``orientation`` (axes permuted)."""
    sizes = [float(v) for v in voxel_sizes(np.asarray(affine, dtype=float))]
    return _permuted(sizes, _ornt(affine, check_orientation(orientation)))  # type: ignore[return-value]


def plan_grid(
    shape: Sequence[int],
    affine: np.ndarray,
    *,
    orientation: str = DEFAULT_ORIENTATION,
    target_spacing: Sequence[float] | None = None,
) -> GridMap:
    """The model grid of an input grid ``(shape, affine)``.

    Args:
        shape: input spatial shape ``(X, Y, Z)``.
        affine: input voxel-to-world matrix ``(4, 4)``.
        orientation: axis codes of the model grid.
        target_spacing: voxel size (mm) of the model grid, in its own axis order; ``None`` keeps
            the input's spacing (reorientation only).

    Raises:
        ConfigError: a non-positive target spacing.
    """
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=float)
    orientation = check_orientation(orientation)
    ornt = _ornt(affine, orientation)
    grid = GridMap(shape, affine, ornt, orientation, shape, affine, False)  # type: ignore[arg-type]
    re_shape, re_affine = grid.reoriented_shape, grid.reoriented_affine
    spacing = voxel_sizes(re_affine)
    if target_spacing is None or np.allclose(spacing, target_spacing, rtol=SPACING_RTOL, atol=0):
        return GridMap(shape, affine, ornt, orientation, re_shape, re_affine, False)  # type: ignore[arg-type]
    target = np.asarray([float(v) for v in target_spacing])
    if target.shape != (3,) or np.any(target <= 0) or not np.all(np.isfinite(target)):
        raise ConfigError(f"target_spacing: expected three positive numbers (mm), got {list(target_spacing)!r}")
    r = target / spacing
    n_t = np.maximum(1, np.round(np.asarray(re_shape) / r)).astype(int)
    offset = (np.asarray(re_shape) - 1) / 2 - (n_t - 1) / 2 * r
    step = np.eye(4)
    step[:3, :3] = np.diag(r)
    step[:3, 3] = offset
    model_shape = tuple(int(v) for v in n_t)
    return GridMap(shape, affine, ornt, orientation, model_shape, re_affine @ step, True)  # type: ignore[arg-type]


def _channels(array: np.ndarray) -> tuple[np.ndarray, bool]:
    array = np.asarray(array)
    if array.ndim == 3:
        return array[None], True
    if array.ndim == 4:
        return array, False
    raise ValueError(f"expected an (X, Y, Z) or channel-first (C, X, Y, Z) array, got shape {array.shape}")


def _reorient(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume, ornt))


def to_model_grid(array: np.ndarray, grid: GridMap, *, order: int = 1) -> np.ndarray:
    """An input-grid array ``(X, Y, Z)`` or ``(C, X, Y, Z)`` on the model grid.

    Args:
        array: on ``grid.input_shape``.
        grid: from :func:`plan_grid`.
        order: spline order: 3 (cubic; images), 1 (linear; masks) or 0 (nearest; label maps).
            With ``order > 0`` an axis that is downsampled is first smoothed by a Gaussian of
            ``(r - 1) / 2`` voxels (anti-aliasing).

    Returns:
        The array on ``grid.shape`` with the input's dtype (float32 for interpolated images).
    """
    channels, single = _channels(array)
    if tuple(channels.shape[1:]) != tuple(grid.input_shape):
        raise ValueError(f"array of spatial shape {channels.shape[1:]} is not on the input grid {grid.input_shape}")
    if grid.identity:
        return np.asarray(array)
    out = []
    r, offset = grid._scale()
    for channel in channels:
        volume = _reorient(channel, grid.ornt)
        if grid.resampled:
            if order > 0:
                sigma = np.maximum(0.0, (r - 1.0) / 2.0)
                volume = volume.astype(np.float32, copy=False)
                if np.any(sigma > 0):
                    volume = ndimage.gaussian_filter(volume, sigma=sigma, mode="nearest")
            volume = ndimage.affine_transform(
                volume, r, offset=offset, output_shape=grid.shape, order=order, mode="nearest", prefilter=order > 1
            )
        out.append(volume)
    stacked = np.stack(out)
    return stacked[0] if single else stacked


def to_input_grid(array: np.ndarray, grid: GridMap, *, order: int = 1) -> np.ndarray:
    """A model-grid array ``(X', Y', Z')`` or ``(C, X', Y', Z')`` back on the input's exact grid.

    Probabilities go back with ``order=1`` (linear, no smoothing), so that thresholding happens
    on the input grid. Voxels of the input grid beyond the model grid's last voxel centre take the
    nearest edge value.

    Returns:
        The array on ``grid.input_shape`` (float32 when interpolated).
    """
    channels, single = _channels(array)
    if tuple(channels.shape[1:]) != tuple(grid.shape):
        raise ValueError(f"array of spatial shape {channels.shape[1:]} is not on the model grid {grid.shape}")
    if grid.identity:
        return np.asarray(array)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple(grid.orientation)), _src(grid))
    r, offset = grid._scale()
    out = []
    for channel in channels:
        volume = channel
        if grid.resampled:
            volume = ndimage.affine_transform(
                np.asarray(volume, dtype=np.float32) if order > 0 else np.asarray(volume),
                1.0 / r,
                offset=-offset / r,
                output_shape=grid.reoriented_shape,
                order=order,
                mode="nearest",
                prefilter=False,
            )
        out.append(_reorient(volume, back))
    stacked = np.stack(out)
    return stacked[0] if single else stacked


def _src(grid: GridMap) -> np.ndarray:
    return nib.orientations.io_orientation(np.asarray(grid.input_affine, dtype=float))


def resample_world(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Resample ``array`` ``(X, Y, Z)`` from one grid onto another by world coordinates.

    ``out[o] = array[inv(src_affine) @ dst_affine @ o]`` (``scipy.ndimage.affine_transform``,
    ``order`` 1 linear / 0 nearest; ``cval`` outside the source). No anti-aliasing: for
    comparing a prediction with another grid's, or building test volumes.
    """
    matrix = np.linalg.inv(np.asarray(src_affine, dtype=float)) @ np.asarray(dst_affine, dtype=float)
    source = np.asarray(array, dtype=np.float32) if order > 0 else np.asarray(array)
    return ndimage.affine_transform(
        source, matrix, output_shape=tuple(int(s) for s in dst_shape), order=order, mode="constant", cval=cval
    )


def median_spacing(spacings: Iterable[Sequence[float]]) -> tuple[float, float, float] | None:
    """Per-axis median of voxel sizes (nnU-Net's target spacing), rounded to 1e-4 mm; ``None`` if empty."""
    rows = np.asarray([[float(v) for v in s] for s in spacings], dtype=float)
    if rows.size == 0:
        return None
    if rows.ndim != 2 or rows.shape[1] != 3:
        raise ValueError(f"expected (N, 3) spacings, got shape {rows.shape}")
    return tuple(float(round(v, 4)) for v in np.median(rows, axis=0))  # type: ignore[return-value]
