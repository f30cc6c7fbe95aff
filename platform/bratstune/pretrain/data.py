"""Unlabelled volumes for MAE pre-training: any cohort folders, random 3-D crops and flips.

* :func:`collect_cases` discovers the cases of every folder (any BraTS naming, any challenge;
  labels are ignored, cases without labels are welcome).
* :func:`prepare_volumes` fills the preprocessing cache once, in the driver; workers then open
  the same entries as memory maps (:func:`load_images`), no NIfTI decoding.
* :class:`CropSampler` draws batches of ``(C, *crop)`` crops (zero-padded where a volume is
  smaller than the crop) with independent flips per axis. Batch ``(epoch, step)`` of worker
  ``rank`` depends only on ``(seed, rank, epoch, step)``: workers see different crops, and a
  resumed run continues the stream exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bratstune.config_utils import from_dict
from bratstune.data.cache import CaseCache
from bratstune.data.layout import discover
from bratstune.data.preprocess import PreprocessConfig
from bratstune.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["CropSampler", "collect_cases", "load_images", "prepare_volumes", "preprocess_config", "random_crop"]


def preprocess_config(mapping: Any) -> Any:
    """``data.preprocess`` as a validated ``PreprocessConfig``."""

    if isinstance(mapping, PreprocessConfig):
        return mapping
    return from_dict(PreprocessConfig, mapping or {}, where="pretrain.data.preprocess")


def collect_cases(folders: Iterable[str | Path]) -> list[Any]:
    """Every complete case under ``folders`` (labels not needed; duplicated ids dropped).

    Raises:
        DataError: a folder is missing, or no case was found at all.
    """

    cases: dict[str, Any] = {}
    folders = [Path(f) for f in folders]
    if not folders:
        raise DataError(None, "no cohort folder given for pre-training")
    for folder in folders:
        cohort = discover(folder, strict=False)
        for problem in cohort.problems:
            logger.warning("skipped: %s", problem)
        for case in cohort.cases:
            if case.case_id in cases:
                logger.warning("%s: case id %s already seen in another folder; skipped", folder, case.case_id)
                continue
            cases[case.case_id] = case
        logger.info("%s: %d case(s) (%s)", folder, len(cohort.cases), cohort.convention)
    if not cases:
        raise DataError(
            folders[0] if len(folders) == 1 else None, f"no complete case found in {[str(f) for f in folders]}"
        )
    return [cases[k] for k in sorted(cases)]


def prepare_volumes(
    cases: Sequence[Any], preprocess: Any, *, cache_root: Path | None = None, workers: int = 1
) -> list[Any]:
    """Preprocess ``cases`` into the cache (crop to brain, z-score ...); returns ``PreprocessedCase`` s."""

    return CaseCache(cache_root).prepare(list(cases), preprocess_config(preprocess), workers=workers)


def load_images(cases: Sequence[Any], preprocess: Any, *, cache_root: Path | None = None) -> list[np.ndarray]:
    """The cached ``(C, X, Y, Z)`` images of ``cases`` as memory maps (prepared by the driver)."""

    cache = CaseCache(cache_root)
    config = preprocess_config(preprocess)
    return [cache.load(case, config).image for case in cases]


def random_crop(
    image: np.ndarray, crop: Sequence[int], rng: np.random.Generator, *, flip_prob: float = 0.0
) -> np.ndarray:
    """A ``(C, *crop)`` float32 crop at a uniformly random position, zero-padded (centred) where
    the image is smaller, each spatial axis flipped with probability ``flip_prob``."""
    starts, pads = [], []
    for size, want in zip(image.shape[1:], crop):
        if size >= want:
            starts.append(int(rng.integers(0, size - want + 1)))
            pads.append((0, 0))
        else:
            starts.append(0)
            before = (want - size) // 2
            pads.append((before, want - size - before))
    region = tuple(slice(s, s + min(w, size)) for s, w, size in zip(starts, crop, image.shape[1:]))
    out = np.asarray(image[(slice(None),) + region], dtype=np.float32)
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, [(0, 0)] + pads)
    for axis in range(3):
        if rng.random() < flip_prob:
            out = np.flip(out, axis=axis + 1)
    return np.ascontiguousarray(out)


class CropSampler:
    """Deterministic batches of random crops (see the module docstring).

    Args:
        images: ``(C, X, Y, Z)`` arrays (memory maps are fine).
        crop: crop size (``model.img_size``).
        seed, rank: stream identity.
        flip_prob: per-axis flip probability.
    """

    def __init__(
        self, images: Sequence[np.ndarray], crop: Sequence[int], *, seed: int, rank: int, flip_prob: float = 0.5
    ) -> None:
        if not images:
            raise DataError(None, "no volume to sample crops from")
        self.images = list(images)
        self.crop = tuple(int(c) for c in crop)
        self.seed = int(seed)
        self.rank = int(rank)
        self.flip_prob = float(flip_prob)

    def rng(self, epoch: int, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, int(epoch), int(step)])

    def batch(self, epoch: int, step: int, batch_size: int) -> tuple[torch.Tensor, np.random.Generator]:
        """``(B, C, *crop)`` float32 tensor, and the generator (for the masking noise) after it."""
        rng = self.rng(epoch, step)
        picks = rng.integers(0, len(self.images), size=batch_size)
        crops = [random_crop(self.images[i], self.crop, rng, flip_prob=self.flip_prob) for i in picks]
        return torch.from_numpy(np.stack(crops)), rng
