"""Volume I/O with errors that name the file: header reads, validated volume reads, atomic writes.

One file at a time; a whole case (four modalities + label) is :mod:`bratstune.data.case`.
Every failure of nibabel, gzip or zlib on a damaged file becomes a `DataError` ``"<file>: <problem>"``
so that a cohort scan can report it and move on.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from bratstune.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "AFFINE_TOLERANCE",
    "NIFTI_SUFFIXES",
    "VolumeInfo",
    "check_same_grid",
    "is_nifti",
    "nifti_stem",
    "read_info",
    "read_volume",
    "write_nifti_atomic",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_TOLERANCE = 1e-3  # max absolute difference between affines of one case (mm)

# what nibabel / gzip / zlib raise on a damaged file
_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ImageFileError, ValueError, struct.error)


def is_nifti(path: str | Path) -> bool:
    """True for ``*.nii`` / ``*.nii.gz`` files that are not macOS ``._`` resource forks."""
    name = Path(path).name
    return not name.startswith("._") and name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class VolumeInfo:
    """Geometry from a NIfTI header, without decoding voxels.

    Attributes:
        path: the file.
        shape: full shape as stored (3-D, or 4-D for MSD / trailing singleton).
        affine: 4x4 voxel → world (mm) matrix.
        spacing: voxel size of the first three axes (mm).
        dtype: on-disk data type.
    """

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: np.dtype

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.shape[:3])  # type: ignore[return-value]


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        img = nib.load(str(path))
    except _READ_ERRORS as exc:
        raise DataError(
            path, f"cannot read NIfTI header ({_reason(exc, path)}); the file is corrupt or not NIfTI"
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(path, f"expected a NIfTI image, got {type(img).__name__}")
    return img


def _reason(exc: BaseException, path: Path) -> str:
    text = str(exc).replace(str(path), path.name).replace("\n", " ").strip() or "no details"
    return f"{type(exc).__name__}: {text}"


def _decode(path: Path, img: nib.Nifti1Image) -> np.ndarray:
    """Voxel array of ``img``; a gzip file is decompressed whole first, so that its CRC and length
    trailer are verified (nibabel stops reading after the last voxel and would miss a bad trailer)."""
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            img = type(img).from_bytes(fh.read())
    return np.asanyarray(img.dataobj)


def read_info(path: str | Path) -> VolumeInfo:
    """Read shape, affine and spacing from the header only (fast: no voxel decoding).

    Raises:
        DataError: missing file or unreadable header.
    """
    path = Path(path)
    img = _load(path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    while len(zooms) < 3:
        zooms = zooms + (1.0,)
    return VolumeInfo(
        path=path,
        shape=tuple(int(s) for s in img.shape),
        affine=np.asarray(img.affine, dtype=np.float64),
        spacing=zooms,  # type: ignore[arg-type]
        dtype=img.get_data_dtype(),
    )


def expected_spatial(shape: tuple[int, ...], *, path: Path, channels: bool = False) -> tuple[int, int, int]:
    """Validate dimensionality: 3-D (a trailing singleton axis allowed), or ``X, Y, Z, C`` if ``channels``.

    Raises:
        DataError: ``"<file>: expected a 3-D volume, got shape (8, 9, 10, 4)"``.
    """
    dims = tuple(shape)
    if channels:
        if len(dims) != 4:
            raise DataError(path, f"expected a 4-D multi-channel volume (X, Y, Z, C), got shape {dims}")
        return dims[:3]  # type: ignore[return-value]
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) != 3:
        raise DataError(
            path,
            f"expected a 3-D volume, got {len(shape)}-D shape {tuple(shape)}; "
            "store one modality per file (or use the MSD layout for 4-D images)",
        )
    return dims  # type: ignore[return-value]


def read_volume(
    path: str | Path,
    *,
    dtype: type | np.dtype | None = np.float32,
    channels: bool = False,
    check_finite: bool = True,
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Decode one NIfTI file into an array of ``dtype``, validating it.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        dtype: output dtype (float32 for images); None keeps the stored dtype (labels, checked by the caller).
        channels: expect ``(X, Y, Z, C)`` (MSD 4-D image) instead of ``(X, Y, Z)``.
        check_finite: reject NaN / Inf voxels.

    Returns:
        ``(array, image)``: array ``(X, Y, Z)`` or ``(X, Y, Z, C)``; the nibabel image (header, affine).

    Raises:
        DataError: missing file, corrupt gzip / truncated data, wrong dimensionality, NaN/Inf voxels.
    """
    path = Path(path)
    img = _load(path)
    spatial = expected_spatial(img.shape, path=path, channels=channels)
    try:
        raw = _decode(path, img)
    except _READ_ERRORS as exc:
        raise DataError(
            path,
            f"cannot decode voxel data ({_reason(exc, path)}); the file is truncated or corrupt, re-download or re-export it",
        ) from exc
    except MemoryError as exc:  # pragma: no cover - depends on the machine
        raise DataError(path, f"not enough memory to decode shape {img.shape}") from exc
    if not channels:
        raw = raw.reshape(spatial)
    if check_finite and raw.dtype.kind == "f":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            n_nan = int(np.count_nonzero(np.isnan(raw)))
            raise DataError(
                path, f"{bad} non-finite voxels ({n_nan} NaN, {bad - n_nan} Inf); fix or re-export the image"
            )
    return np.asarray(raw, dtype=dtype), img


def check_same_grid(
    info: VolumeInfo | tuple[Path, tuple[int, ...], np.ndarray],
    reference: VolumeInfo | tuple[Path, tuple[int, ...], np.ndarray],
    *,
    tolerance: float = AFFINE_TOLERANCE,
) -> None:
    """Raise unless two volumes share spatial shape and affine (within ``tolerance`` mm).

    Args:
        info, reference: `VolumeInfo` or ``(path, spatial_shape, affine)``.

    Raises:
        DataError: naming ``info``'s file, the two shapes (or the largest affine difference) and the reference file.
    """
    path, shape, affine = _grid(info)
    ref_path, ref_shape, ref_affine = _grid(reference)
    if tuple(shape) != tuple(ref_shape):
        raise DataError(path, f"shape {tuple(shape)} differs from {ref_path.name} shape {tuple(ref_shape)}")
    diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(ref_affine))))
    if not diff <= tolerance:
        raise DataError(
            path,
            f"affine differs from {ref_path.name} by up to {diff:.4g} (tolerance {tolerance:g}); "
            "the modalities are not co-registered",
        )


def _grid(x: VolumeInfo | tuple[Path, tuple[int, ...], np.ndarray]) -> tuple[Path, tuple[int, ...], np.ndarray]:
    if isinstance(x, VolumeInfo):
        return x.path, x.spatial_shape, x.affine
    return Path(x[0]), tuple(x[1])[:3], np.asarray(x[2])


def _storage_dtype(array: np.ndarray) -> np.dtype:
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return np.dtype(np.int32)
    if array.dtype == np.float16:
        return np.dtype(np.float32)
    return array.dtype


def write_nifti_atomic(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
) -> None:
    """Write ``array`` as NIfTI so that ``path`` is either absent, the old file, or complete.

    The image goes to a temporary file in the same folder (same file system), is flushed to
    disk, and is moved over ``path`` with ``os.replace``. Compression follows the suffix
    (``.nii.gz`` → gzip). The on-disk dtype is the array's (bool → uint8, int64 → int32 when the
    values fit), even when ``header`` comes from an image of another dtype; scaling is reset.

    Args:
        path: destination ``.nii`` / ``.nii.gz``; parent folders are created.
        array: voxels ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        affine: 4x4 voxel → world matrix (kept exactly, sform and qform).
        header: optional header to copy (description, units, intent).
    """
    path = Path(path)
    if not is_nifti(path):
        raise DataError(path, "output file name must end with .nii or .nii.gz")
    array = np.asarray(array)
    dtype = _storage_dtype(array)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(array.astype(dtype, copy=False), np.asarray(affine, dtype=np.float64), hdr, dtype=dtype)
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(None, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{nifti_stem(path)}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        nib.save(img, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote %s %s %s", path, array.shape, dtype)
