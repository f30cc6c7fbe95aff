"""Background loading of training batches for :func:`bratstune.training.fit.fit`.

The whole run is **one** DataLoader iterator over ``(epoch, i)`` keys, so the worker processes
live for the whole run (what ``persistent_workers`` gives, without re-creating iterators at
epoch boundaries) and keep preparing the next epoch's first batches while the training process
validates. Sample ``(epoch, i)`` is :class:`bratstune.data.sampling.PatchDataset`'s sample ``i``
of ``epoch``, whose randomness depends only on ``(seed, epoch, i)``: the batches are the same
for any number of workers and a resumed run sees exactly the batches it would have seen.

Each item is ``{"image": float32 (C, P, P, P), "target": ...}`` where the target is built in
the worker from the patch's labels: region mode ``labels.labels_to_regions`` → bool
``(R, P, P, P)``; label mode → int64 class indices ``(1, P, P, P)`` (see
:func:`bratstune.inference.outputs.labels_to_classes`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bratstune.data.augment import build_augment
from bratstune.data.sampling import PatchDataset
from bratstune.inference.outputs import labels_to_classes
from bratstune.labels import labels_to_regions
from bratstune.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["EpochPatches", "EpochSampler", "build_train_loader"]


class EpochPatches(Dataset):
    """``PatchDataset`` indexed by ``(epoch, i)``, with the loss target built from the labels.

    Args:
        patches: a :class:`bratstune.data.sampling.PatchDataset`.
        scheme: label scheme of the cases.
        mode: ``region`` or ``label``.
    """

    def __init__(self, patches: Any, scheme: Any, mode: str) -> None:
        self.patches = patches
        self.scheme = scheme
        self.mode = mode

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, i = key
        if self.patches.epoch != epoch:
            self.patches.set_epoch(epoch)
        sample = self.patches[i]
        label = torch.as_tensor(sample["label"])[0].to(torch.uint8).numpy()
        if self.mode == "region":
            target = torch.from_numpy(labels_to_regions(label, self.scheme))
        else:
            target = torch.from_numpy(labels_to_classes(label, self.scheme)[None])
        return {"image": torch.as_tensor(sample["image"], dtype=torch.float32), "target": target}


class EpochSampler(Sampler):
    """Yields ``(epoch, i)`` for ``epoch`` in ``start_epoch + 1 .. epochs`` and ``i < samples``."""

    def __init__(self, *, start_epoch: int, epochs: int, samples_per_epoch: int) -> None:
        self.start_epoch = start_epoch
        self.epochs = epochs
        self.samples_per_epoch = samples_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.start_epoch + 1, self.epochs + 1):
            for i in range(self.samples_per_epoch):
                yield epoch, i

    def __len__(self) -> int:
        return max(0, self.epochs - self.start_epoch) * self.samples_per_epoch


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(
    config: TrainConfig,
    cases: Sequence[Any],
    scheme: Any,
    *,
    start_epoch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The run's DataLoader (iterate it once; ``steps_per_epoch`` batches per epoch).

    Args:
        config: the training config (patch size, batch size, fg probability, augmentation, seed).
        cases: labelled preprocessed cases.
        scheme: their label scheme.
        start_epoch: epochs already done (resume).
        num_workers: background worker processes (0 = in the training process).
        pin_memory: page-locked batches for faster host-to-GPU copies (CUDA only).
    """

    transform = None
    if config.data.augment is not None:
        transform = build_augment(dict(config.data.augment))
    samples = config.steps_per_epoch * config.data.batch_size
    patches = PatchDataset(
        cases,
        config.data.patch_size,
        samples_per_epoch=samples,
        fg_prob=config.data.fg_prob,
        transform=transform,
        seed=config.seed,
    )
    dataset = EpochPatches(patches, scheme, config.loss.mode)
    sampler = EpochSampler(start_epoch=start_epoch, epochs=config.epochs, samples_per_epoch=samples)
    generator = torch.Generator().manual_seed(config.seed)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"prefetch_factor": config.data.prefetch_factor, "worker_init_fn": _seed_worker}
    return DataLoader(
        dataset,
        batch_size=config.data.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        generator=generator,
        **extra,
    )
