"""One case: its files (:class:`Case`), its loaded arrays (:class:`CaseData`), load and validate.

* :func:`load_case` is strict: it raises the first problem, naming the file.
* :func:`validate_case` collects every problem of a case (optionally from headers only), so that
  ``bratstune inspect`` can list them all and a cohort scan can move on.

Cases are found in a cohort folder by :func:`bratstune.data.layout.discover`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bratstune.data.nifti import (
    VolumeInfo,
    check_same_grid,
    expected_spatial,
    read_info,
    read_volume,
)
from bratstune.errors import DataError
from bratstune.labels import LabelScheme, check_labels, get_scheme

logger = logging.getLogger(__name__)

__all__ = ["MODALITIES", "Case", "CaseData", "CaseReport", "load_case", "validate_case"]

#: Canonical modality order everywhere: native T1, contrast T1, T2, FLAIR.
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")


@dataclass(frozen=True)
class Case:
    """One subject's files.

    Attributes:
        case_id: e.g. ``"BraTS-GLI-00000-000"``, ``"BraTS2021_00000"``, ``"BRATS_001"``.
        images: canonical modality → file (MSD: all four point at the same 4-D file).
        label: segmentation file, or None for unlabelled cases.
        convention: ``"brats2023" | "brats2021" | "brats2020" | "msd"``.
        challenge: ``"GLI"``, ``"PED"``, ... when the name says so, else None.
        channel: MSD 4-D only: modality → index of the 4th axis.
    """

    case_id: str
    images: Mapping[str, Path]
    label: Path | None
    convention: str
    challenge: str | None
    channel: Mapping[str, int] | None = None

    def __hash__(self) -> int:
        return hash((self.case_id, self.convention, self.label))

    @property
    def files(self) -> tuple[Path, ...]:
        """Distinct files of the case: images (in modality order) then the label."""
        out: list[Path] = []
        for p in self.images.values():
            if p not in out:
                out.append(p)
        if self.label is not None:
            out.append(self.label)
        return tuple(out)


@dataclass
class CaseData:
    """A loaded case.

    Attributes:
        image: float32 ``(C, X, Y, Z)``, channels in `MODALITIES` order (C = 4).
        label: uint8 ``(X, Y, Z)`` in the case's label scheme, or None.
        affine: 4x4 voxel → world matrix of the first modality.
        header: nibabel header of the first modality (reuse it when writing predictions).
        spacing: voxel size (mm) of the first three axes.
    """

    case: Case
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]


@dataclass
class CaseReport:
    """What `validate_case` found: geometry, label values and every problem of one case."""

    case: Case
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    label_values: tuple[int, ...] | None = None
    problems: list[DataError] = field(default_factory=list)


# ---------------------------------------------------------------------------------- whole cases


def _label_array(raw: np.ndarray, path: Path) -> np.ndarray:
    """Integer-valued labels in 0..255 as uint8, else DataError."""
    if raw.dtype.kind == "f":
        frac = raw != np.round(raw)
        if frac.any():
            example = float(raw[frac].flat[0])
            raise DataError(
                path,
                f"{int(frac.sum())} non-integer label voxels (e.g. {example:g}); a segmentation must hold "
                "integer labels (was it resampled with linear interpolation?)",
            )
    elif raw.dtype.kind not in "iub":
        raise DataError(path, f"unsupported label data type {raw.dtype}")
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise DataError(path, f"label values outside 0..255 (min {raw.min():g}, max {raw.max():g})")
    return raw.astype(np.uint8, copy=False)


def _check_channel_count(case: Case, shape: tuple[int, ...], path: Path) -> None:
    need = max((case.channel or {}).values(), default=-1) + 1
    if len(shape) != 4 or shape[3] < need:
        raise DataError(
            path, f"expected {need} channels on the 4th axis (FLAIR, T1w, t1gd, T2w), got shape {tuple(shape)}"
        )


def _image_channels(case: Case, arr: np.ndarray, path: Path) -> dict[str, np.ndarray]:
    """Split an MSD 4-D array ``(X, Y, Z, C)`` into modalities."""
    _check_channel_count(case, arr.shape, path)
    return {mod: arr[..., idx] for mod, idx in (case.channel or {}).items()}


def _check_not_blank(case: Case, volumes: dict[str, np.ndarray]) -> None:
    """A modality whose every voxel is 0 is a failed export, not an image."""
    for mod, arr in volumes.items():
        if arr.size and not np.any(arr):
            raise DataError(case.images[mod], f"every voxel of {mod} is 0 (a blank image); re-export it")


def load_case(case: Case, *, scheme: LabelScheme | str | None = None) -> CaseData:
    """Load and validate one case.

    Args:
        case: from `discover`.
        scheme: if given, label values outside it are an error.

    Returns:
        `CaseData`: image float32 ``(C, X, Y, Z)`` in `MODALITIES` order, label uint8 ``(X, Y, Z)`` or None.

    Raises:
        DataError: naming the file: missing or corrupt file (bad gzip, truncated), 4-D volume where 3-D
            is expected, shape or affine differing between modalities / label, NaN/Inf voxels, a blank
            (all-zero) modality, non-integer or unknown label values.
    """
    msd = case.channel is not None
    volumes: dict[str, np.ndarray] = {}
    ref: tuple[Path, tuple[int, ...], np.ndarray] | None = None
    header = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    for path in dict.fromkeys(case.images.values()):
        arr, img = read_volume(path, channels=msd)
        grid = (path, arr.shape[:3], np.asarray(img.affine))
        if ref is None:
            ref, header = grid, img.header
            spacing = tuple(float(z) for z in img.header.get_zooms()[:3])  # type: ignore[assignment]
        else:
            check_same_grid(grid, ref)
        if msd:
            volumes.update(_image_channels(case, arr, path))
        else:
            volumes.update({mod: arr for mod, p in case.images.items() if p == path})
    if ref is None:
        raise DataError(None, f"case '{case.case_id}' has no image files")
    _check_not_blank(case, volumes)
    # case.images is in MODALITIES order (t1n, t1c, t2w, t2f)
    image = np.stack([volumes[mod] for mod in case.images]).astype(np.float32, copy=False)
    label = None
    if case.label is not None:
        raw, img = read_volume(case.label, dtype=None)
        check_same_grid((case.label, raw.shape, np.asarray(img.affine)), ref)
        label = _label_array(raw, case.label)
        if scheme is not None:
            check_labels(label, get_scheme(scheme), source=case.label)
    return CaseData(case, image, label, np.asarray(ref[2], dtype=np.float64), header, spacing)


def validate_case(case: Case, *, scheme: LabelScheme | str | None = None, read_voxels: bool = True) -> CaseReport:
    """Check every file of a case and collect every problem instead of stopping at the first.

    Args:
        case: from `discover`.
        scheme: if given, label values outside it are reported.
        read_voxels: decode image voxels (finds corrupt gzip and NaN/Inf); False reads only the image
            headers (geometry) — labels are always decoded to report their values.

    Returns:
        `CaseReport` with the first image's spatial shape and spacing, the label values found and the problems.
    """
    report = CaseReport(case)
    msd = case.channel is not None
    ref: VolumeInfo | None = None
    failed = object()

    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except DataError as exc:
            report.problems.append(exc)
            return failed

    for path in dict.fromkeys(case.images.values()):
        info = attempt(lambda: read_info(path))
        if info is failed or attempt(lambda: expected_spatial(info.shape, path=path, channels=msd)) is failed:
            continue
        if msd and attempt(lambda: _check_channel_count(case, info.shape, path)) is failed:
            continue
        if ref is None:
            ref = info
            report.shape, report.spacing = info.spatial_shape, info.spacing
        elif attempt(lambda: check_same_grid(info, ref)) is failed:
            continue
        if read_voxels:
            loaded = attempt(lambda: read_volume(path, channels=msd))
            if loaded is not failed:
                arr = loaded[0]
                mods = (
                    _image_channels(case, arr, path) if msd else {m: arr for m, p in case.images.items() if p == path}
                )
                attempt(lambda: _check_not_blank(case, mods))
    if case.label is not None:
        label_path = case.label
        info = attempt(lambda: read_info(label_path))
        if info is failed:
            return report
        if ref is not None:
            attempt(lambda: check_same_grid(info, ref))
        loaded = attempt(lambda: read_volume(label_path, dtype=None))
        if loaded is failed:
            return report
        label = attempt(lambda: _label_array(loaded[0], label_path))
        if label is failed:
            return report
        report.label_values = tuple(int(v) for v in np.flatnonzero(np.bincount(label.ravel(), minlength=1)))
        if scheme is not None:
            attempt(lambda: check_labels(label, get_scheme(scheme), source=label_path))
    return report
