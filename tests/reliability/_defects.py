"""Valid tiny synthetic cohorts and the defects the bad-input suite plants in them, one per cohort.

Each defect is a function ``(root, case_id) -> Path``: it damages one case of a valid cohort
written by :func:`valid_cohort` (or the cohort itself) and returns the file or folder that the
error must name. ``DEFECTS`` maps a defect name to ``(kind, function)``:

* ``"image"``: a case's images are bad; its labels are fine (``evaluate`` needs only labels, so it
  must still score every case; ``inspect`` lists the file; ``train`` refuses naming it; batch
  prediction records the case in ``failures.csv`` and predicts the others);
* ``"label"``: a case's segmentation is bad (``evaluate`` and ``train`` refuse naming it; prediction
  does not read labels and predicts every case);
* ``"cohort"``: the cohort cannot be used as it is: a duplicate or misnamed case, a symlink loop, an
  empty folder (every command names the folder, link or file; batch prediction records a case-level
  problem in ``failures.csv`` and predicts the rest, and refuses an unusable folder);
* ``"valid"``: odd but valid data: every command works.

Shapes are tiny (32 x 32 x 24 voxels) so the whole suite runs in seconds per command.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (32, 32, 24)
MODALITIES = ("t1n", "t1c", "t2w", "t2f")
CASES = 3


def valid_cohort(root: Path, *, cases: int = CASES, seed: int = 3) -> list[str]:
    """``cases`` procedural GLI cases (BraTS 2023 naming, labels included) under ``root``."""
    from bratstune.data.synthetic import generate_cohort

    return generate_cohort(root, challenge="GLI", cases=cases, shape=SHAPE, anatomy="procedural", seed=seed, workers=1)


def _file(root: Path, case_id: str, mod: str) -> Path:
    return root / case_id / f"{case_id}-{mod}.nii.gz"


def _rewrite(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(array, img.affine if affine is None else affine), str(path))
    return path


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# -- damaged files ------------------------------------------------------------------------------------


def truncated_gzip(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t2w")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def gzip_crc_error(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t1c")
    data = path.read_bytes()
    path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:])  # CRC32 broken, size kept
    return path


def zero_byte_file(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t1n")
    path.write_bytes(b"")
    return path


def not_nifti(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t2f")
    path.write_bytes(b"<html><body>404 Not Found</body></html>\n" * 40)
    return path


# -- wrong case contents ---------------------------------------------------------------------------------


def missing_modality(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t2f")
    path.unlink()
    return path


def extra_unknown_file(root: Path, case_id: str) -> Path:
    """A fifth NIfTI no convention knows (e.g. an ADC map): ignored and listed, never read as a modality."""
    path = root / case_id / f"{case_id}-adc.nii.gz"
    shutil.copy(_file(root, case_id, "t1n"), path)
    return path


def shape_mismatch(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t2w")
    return _rewrite(path, _voxels(path)[:, :, :-2])


def affine_mismatch(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t1c")
    img = nib.load(path)
    shifted = img.affine.copy()
    shifted[:3, 3] += (3.0, 0.0, 0.0)  # 3 mm: far beyond the 1e-3 mm tolerance
    return _rewrite(path, np.asarray(img.dataobj), shifted)


# -- bad voxels -----------------------------------------------------------------------------------------


def nan_inf_voxels(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t1n")
    data = _voxels(path).astype(np.float32)
    data[1, 2, 3], data[4, 5, 6] = np.nan, np.inf
    return _rewrite(path, data)


def all_zero_modality(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t1c")
    return _rewrite(path, np.zeros(_voxels(path).shape, np.float32))


def four_d_volume(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "t2w")
    data = _voxels(path)
    return _rewrite(path, np.stack([data, data], axis=-1))


def int16_float64_mix(root: Path, case_id: str) -> Path:
    """Valid: one modality stored as int16, another as float64 (scanners and converters differ)."""
    a, b = _file(root, case_id, "t1n"), _file(root, case_id, "t2w")
    _rewrite(a, np.round(_voxels(a) * 1000).astype(np.int16))
    _rewrite(b, _voxels(b).astype(np.float64))
    return a


# -- bad labels -------------------------------------------------------------------------------------------


def labels_outside_scheme(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "seg")
    data = _voxels(path).astype(np.uint8)
    tumour = np.argwhere(data > 0)[:2]  # inside the brain: training would see them (as background)
    data[tuple(tumour[0])], data[tuple(tumour[1])] = 7, 9  # GLI schemes have 0..3 (2023) or 0..4 (2024+)
    return _rewrite(path, data)


def fractional_labels(root: Path, case_id: str) -> Path:
    path = _file(root, case_id, "seg")
    data = _voxels(path).astype(np.float32)
    data[data > 0] -= 0.5  # e.g. a label map resampled with linear interpolation
    return _rewrite(path, data)


# -- geometry (valid) -------------------------------------------------------------------------------------


def anisotropic(root: Path, case_id: str) -> Path:
    """Valid: every file of the case at 0.5 x 0.5 x 6 mm (same voxels, new affine)."""
    affine = np.diag([0.5, 0.5, 6.0, 1.0])
    for path in sorted((root / case_id).glob("*.nii.gz")):
        _rewrite(path, _voxels(path), affine)
    return root / case_id


def flipped(root: Path, case_id: str) -> Path:
    """Valid: every file of the case stored with the X and Y axes reversed (the other orientation)."""
    for path in sorted((root / case_id).glob("*.nii.gz")):
        img = nib.load(path)
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = img.shape[0] - 1, img.shape[1] - 1
        _rewrite(path, np.asarray(img.dataobj)[::-1, ::-1], img.affine @ flip)
    return root / case_id


# -- cohort problems ---------------------------------------------------------------------------------------


def _rename_case(root: Path, case_id: str, new_id: str) -> Path:
    folder = root / new_id
    (root / case_id).rename(folder)
    for path in sorted(folder.iterdir()):
        path.rename(folder / path.name.replace(case_id, new_id))
    return folder


def duplicate_case_id(root: Path, case_id: str) -> Path:
    copy = root / "second-delivery" / case_id
    shutil.copytree(root / case_id, copy)
    return copy


def id_with_space(root: Path, case_id: str) -> Path:
    return _rename_case(root, case_id, case_id.replace("GLI-", "GLI-1 ", 1))


def id_with_unicode(root: Path, case_id: str) -> Path:
    return _rename_case(root, case_id, case_id.replace("GLI-", "GLI-ü", 1))


def id_with_dotdot(root: Path, case_id: str) -> Path:
    return _rename_case(root, case_id, case_id.replace("GLI-", "GLI-..-", 1))


def symlink_loop(root: Path, case_id: str) -> Path:
    link = root / case_id / "loop"
    link.symlink_to(root, target_is_directory=True)  # the case folder links back to the cohort
    return link


def empty_cohort(root: Path, case_id: str) -> Path:
    for child in list(root.iterdir()):
        shutil.rmtree(child)
    return root


# -- valid but unusual layouts -------------------------------------------------------------------------------


def symlinked_case_folders(root: Path, case_id: str) -> Path:
    """Valid: the cohort folder holds only symlinks to case folders stored elsewhere."""
    store = root.parent / f"{root.name}-store"
    store.mkdir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        folder.rename(store / folder.name)
        (root / folder.name).symlink_to(store / folder.name, target_is_directory=True)
    return root


def read_only_input(root: Path, case_id: str) -> Path:
    """Valid: every folder and file of the cohort read-only (a mounted archive). Undo with :func:`make_writable`."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
        os.chmod(dirpath, 0o555)
    return root


def make_writable(root: Path) -> None:
    """Undo :func:`read_only_input` (so that pytest can remove the folder)."""
    if not root.exists():
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o644)


Defect = Callable[[Path, str], Path]

DEFECTS: dict[str, tuple[str, Defect]] = {
    "truncated-gzip": ("image", truncated_gzip),
    "gzip-crc-error": ("image", gzip_crc_error),
    "zero-byte-file": ("image", zero_byte_file),
    "not-nifti": ("image", not_nifti),
    "missing-modality": ("image", missing_modality),
    "extra-unknown-file": ("valid", extra_unknown_file),
    "shape-mismatch": ("image", shape_mismatch),
    "affine-mismatch": ("image", affine_mismatch),
    "nan-inf-voxels": ("image", nan_inf_voxels),
    "all-zero-modality": ("image", all_zero_modality),
    "4d-volume": ("image", four_d_volume),
    "int16-float64-mix": ("valid", int16_float64_mix),
    "labels-outside-scheme": ("label", labels_outside_scheme),
    "fractional-labels": ("label", fractional_labels),
    "anisotropic": ("valid", anisotropic),
    "flipped": ("valid", flipped),
    "duplicate-case-id": ("cohort", duplicate_case_id),
    "id-with-space": ("cohort", id_with_space),
    "id-with-unicode": ("cohort", id_with_unicode),
    "id-with-dotdot": ("cohort", id_with_dotdot),
    "symlink-loop": ("cohort", symlink_loop),
    "empty-cohort": ("cohort", empty_cohort),
    "symlinked-case-folders": ("valid", symlinked_case_folders),
    "read-only-input": ("valid", read_only_input),
}
