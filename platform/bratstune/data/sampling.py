"""Fold splits stratified by tumour volume, tumour-focused patch sampling, whole-volume validation.

* :func:`stratified_folds`: k folds in which every fold sees small and large tumours.
* :class:`PatchDataset`: random patches, centred on a tumour voxel with probability
  ``fg_prob``; the randomness of sample ``i`` depends only on ``(seed, epoch, i)``, so a run is
  reproducible whatever the number of DataLoader workers.
* :class:`ValidationDataset`: whole cropped volumes, one per case.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bratstune.data.preprocess import PreprocessedCase
from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["PatchDataset", "ValidationDataset", "stratified_folds", "tumour_volume"]

Sample = dict[str, Any]
Transform = Callable[[Sample], Sample]


def tumour_volume(label: np.ndarray | None, spacing: Sequence[float] | None = None) -> float:
    """Tumour volume: voxels with a non-zero label, in mm³ when ``spacing`` is given.

    Args:
        label: ``(X, Y, Z)`` labels (``None`` counts as 0).
        spacing: voxel size in mm, or ``None`` for a voxel count.
    """
    if label is None:
        return 0.0
    voxels = float(np.count_nonzero(label))
    return voxels * float(np.prod(spacing)) if spacing is not None else voxels


def stratified_folds(volumes: Sequence[float], k: int = 5, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split cases into ``k`` folds stratified by tumour volume.

    Cases are ranked by volume (ties broken at random) and cut into consecutive quantile bins
    of ``k`` cases; each bin deals one case to every fold in a random order (the last, partial
    bin to randomly chosen folds). So every fold spans the whole volume range, fold sizes differ
    by at most one, and the split depends only on ``volumes``, ``k`` and ``seed``.

    Args:
        volumes: one tumour volume per case (any unit).
        k: number of folds, ``2 <= k <= len(volumes)``.
        seed: random seed.

    Returns:
        ``k`` pairs ``(train_idx, val_idx)`` of sorted int64 index arrays; every case is in
        exactly one ``val_idx``.
    """
    values = np.asarray(volumes, dtype=np.float64)
    n = values.size
    if values.ndim != 1:
        raise ValueError(f"expected one volume per case, got an array of shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("tumour volumes must be finite numbers")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2 or k > n:
        raise ConfigError(f"folds: expected an integer 2 <= k <= {n} (the number of cases), got {k!r}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(n), values))  # by volume, random among ties
    fold_of = np.empty(n, dtype=np.int64)
    for start in range(0, n, k):
        members = order[start : start + k]
        folds = rng.permutation(k)[: members.size]
        fold_of[members] = folds
    all_idx = np.arange(n)
    return [(all_idx[fold_of != f], all_idx[fold_of == f]) for f in range(k)]


def _as_size(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    size = (patch_size,) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise ConfigError(f"patch_size: expected an int or three positive ints, got {patch_size!r}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def extract_patch(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Copy ``array[..., start:start+size]``; parts outside the volume are zero (padding).

    Args:
        array: ``(..., X, Y, Z)`` (a memmap is fine: only the patch is read).
        start: corner per spatial axis, may be negative or run past the end.
        size: patch size per spatial axis.
    """
    spatial = array.shape[-3:]
    out = np.zeros(array.shape[:-3] + tuple(size), dtype=array.dtype)
    src, dst = [], []
    for s0, n, dim in zip(start, size, spatial):
        lo, hi = max(s0, 0), min(s0 + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s0, hi - s0))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


class PatchDataset(Dataset):
    """Random training patches, biased towards tumour.

    Sample ``i`` picks a case uniformly, then with probability ``fg_prob`` centres the patch on a
    random tumour voxel (label > 0) and otherwise places it uniformly inside the volume. Volumes
    smaller than the patch are zero-padded (background is 0 after z-scoring). The randomness
    (including the ``transform``'s, via torch's RNG) is seeded from ``(seed, epoch, i)``: call
    :meth:`set_epoch` before each epoch for new patches (with ``persistent_workers=False``, the
    DataLoader default, workers pick the new epoch up).

    Args:
        cases: preprocessed cases with labels (arrays may be memmaps; only patches are read).
        patch_size: patch edge ``P`` or ``(Px, Py, Pz)``.
        samples_per_epoch: length of the dataset.
        fg_prob: probability of a tumour-centred patch (cases without tumour fall back to uniform).
        transform: callable on the sample dict (e.g. :func:`bratstune.data.augment.build_augment`).
        seed: base seed.

    Returns (per item):
        ``{"image": float32 (4, Px, Py, Pz), "label": uint8 (1, Px, Py, Pz), "case_index": int,
        "fg": bool}`` (``fg``: whether the patch was tumour-centred).
    """

    def __init__(
        self,
        cases: Sequence[PreprocessedCase],
        patch_size: int | Sequence[int] = 48,
        *,
        samples_per_epoch: int = 250,
        fg_prob: float = 0.7,
        transform: Transform | None = None,
        seed: int = 0,
    ) -> None:
        self.cases = list(cases)
        if not self.cases:
            raise ValueError("PatchDataset needs at least one case")
        for case in self.cases:
            if case.label is None:
                raise ValueError(f"case {case.case_id} has no label; PatchDataset needs labelled cases")
        self.patch_size = _as_size(patch_size)
        if samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch: expected >= 1, got {samples_per_epoch}")
        if not 0.0 <= fg_prob <= 1.0:
            raise ConfigError(f"fg_prob: expected a probability in [0, 1], got {fg_prob}")
        self.samples_per_epoch = int(samples_per_epoch)
        self.fg_prob = float(fg_prob)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._foreground: dict[int, np.ndarray] = {}  # per process, filled lazily

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of patches (deterministic per epoch)."""
        self.epoch = int(epoch)

    def foreground(self, index: int) -> np.ndarray:
        """Flat indices of the tumour voxels of case ``index`` (computed once per process)."""
        if index not in self._foreground:
            self._foreground[index] = np.flatnonzero(np.asarray(self.cases[index].label).reshape(-1))
        return self._foreground[index]

    def sample_location(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int], bool]:
        """``(case index, patch corner, tumour-centred?)`` for one sample."""
        index = int(rng.integers(len(self.cases)))
        shape = self.cases[index].image.shape[1:]
        want_fg = rng.random() < self.fg_prob
        fg = self.foreground(index) if want_fg else None
        lows = [min(0, d - p) for d, p in zip(shape, self.patch_size)]
        highs = [max(0, d - p) for d, p in zip(shape, self.patch_size)]
        if fg is not None and fg.size:
            centre = np.unravel_index(int(fg[rng.integers(fg.size)]), shape)
            start = tuple(
                int(np.clip(c - p // 2, lo, hi)) for c, p, lo, hi in zip(centre, self.patch_size, lows, highs)
            )
            return index, start, True  # type: ignore[return-value]
        start = tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs))
        return index, start, False  # type: ignore[return-value]

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.samples_per_epoch:
            raise IndexError(f"sample {i} out of range for {self.samples_per_epoch} samples")
        seq = np.random.SeedSequence([self.seed, self.epoch, int(i)])
        rng = np.random.default_rng(seq)
        index, start, centred = self.sample_location(rng)
        case = self.cases[index]
        image = extract_patch(case.image, start, self.patch_size).astype(np.float32, copy=False)
        label = extract_patch(case.label, start, self.patch_size)[None].astype(np.uint8, copy=False)
        sample: Sample = {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label),
            "case_index": index,
            "fg": centred,
        }
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
                sample = self.transform(sample)
            # TorchIO resamples in float: restore the documented dtypes.
            sample["image"] = torch.as_tensor(sample["image"]).to(torch.float32)
            sample["label"] = torch.as_tensor(sample["label"]).round().to(torch.uint8)
        return sample


class ValidationDataset(Dataset):
    """Whole cropped volumes, one item per case, for sliding-window validation.

    Returns (per item):
        ``{"image": float32 (4, x, y, z), "label": uint8 (1, x, y, z) (absent without a label),
        "case_id": str, "index": int}``. Shapes differ between cases: use ``batch_size=1``.
    """

    def __init__(self, cases: Sequence[PreprocessedCase]) -> None:
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> Sample:
        case = self.cases[i]
        item: Sample = {
            "image": torch.from_numpy(np.array(case.image, dtype=np.float32)),
            "case_id": case.case_id,
            "index": int(i),
        }
        if case.label is not None:
            item["label"] = torch.from_numpy(np.array(case.label, dtype=np.uint8)[None])
        return item
