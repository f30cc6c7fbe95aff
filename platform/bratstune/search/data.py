"""A search's data, prepared once in the driver and reopened by every trial.

::

    data = prepare_data(spec, Path("data/GLI"))     # preprocess once, split, fingerprint
    data.load()                                      # in a trial: TrainData of memory maps

Cases are preprocessed once into the on-disk cache; trials reopen them as memory maps
(``share: cache``) or receive them through the object store (``share: object_store``, for
clusters without a shared file system). No trial decodes NIfTI.

A space with ``data.variants`` (e.g. ``search_spaces/preprocessing.yaml``) has every variant cached
here, before the first trial; a trial picks one by name (``data.variant``) with
:meth:`DataHandle.for_trial`, which also records the variant's preprocessing in the trial's config
(so it travels with the model into an ensemble package and is applied at prediction time) and
the training-label dust removal in the trial's data fingerprint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bratstune import paths
from bratstune.config_utils import to_dict
from bratstune.data.cache import CaseCache
from bratstune.data.cohort import TrainData, prepare_cohort, preprocess_config
from bratstune.data.fingerprint import data_fingerprint
from bratstune.data.layout import discover
from bratstune.data.splits import train_val
from bratstune.data.synthetic import generate_cohort
from bratstune.errors import ConfigError
from bratstune.search.space import SearchSpec
from bratstune.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["DataHandle", "job_cohort", "prepare_data", "synthetic_cohort"]


@dataclass
class DataHandle:
    """What a trial needs to rebuild its :class:`~bratstune.data.cohort.TrainData` without decoding NIfTI.

    Attributes:
        root: the cohort folder.
        cache_root: the preprocessing cache (must be reachable by every node in ``cache`` mode).
        train_cases, val_cases: ``bratstune.data.case.Case`` objects of the split.
        preprocess: the ``PreprocessConfig`` the cache was filled with.
        scheme: the label scheme.
        fingerprint: hash of case ids and preprocessing config (logged to MLflow).
        arrays: ``object_store`` mode: the preprocessed train/val cases themselves (plain arrays,
            shipped once through Ray's object store by ``tune.with_parameters``).
        variants: name -> ``PreprocessConfig`` of every preprocessing variant cached for the trials
            (the space's ``data.variants``; empty without).
        cohort_ids: the cases the fingerprint covers (the prepared cohort's).
    """

    root: Path
    cache_root: Path
    train_cases: list[Any]
    val_cases: list[Any]
    preprocess: Any
    scheme: Any
    fingerprint: str
    arrays: tuple[list[Any], list[Any]] | None = None
    variants: dict[str, Any] = field(default_factory=dict)
    cohort_ids: list[str] = field(default_factory=list)

    def variant(self, name: str) -> DataHandle:
        """The handle of the cached preprocessing variant ``name`` (its config and fingerprint)."""
        if name not in self.variants:
            raise ConfigError(
                f"data.variant: no preprocessing variant {name!r} was prepared for this search; "
                f"prepared: {sorted(self.variants) or 'none (the space has no data.variants)'}"
            )
        preprocess = self.variants[name]
        return replace(
            self, preprocess=preprocess, fingerprint=data_fingerprint(self.cohort_ids or self.case_ids, preprocess)
        )

    def for_trial(self, config: TrainConfig) -> tuple[DataHandle, TrainConfig]:
        """The data a trial of ``config`` trains on, and ``config`` recording it.

        ``data.variant`` selects a cached variant and its preprocessing replaces the config's
        ``data.preprocess`` (what an ensemble package applies at prediction time); an enabled
        ``data.label_dust`` enters the fingerprint (the targets differ).
        """
        handle = self
        if config.data.variant is not None:
            handle = self.variant(config.data.variant)
            config = replace(config, data=replace(config.data, preprocess=to_dict(handle.preprocess)))
        if config.data.label_dust.enabled:
            ids = handle.cohort_ids or handle.case_ids
            fingerprint = data_fingerprint(ids, handle.preprocess, label_dust=config.data.label_dust)
            handle = replace(handle, fingerprint=fingerprint)
        return handle, config

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.train_cases + self.val_cases]

    def case_record(self) -> dict[str, list[str]]:
        """What every trial trains on and what chooses its epoch and the best trial (``cases.json``)."""
        return {"trained": sorted(c.case_id for c in self.train_cases), "selected": sorted(self.val_ids)}

    @property
    def val_ids(self) -> list[str]:
        return [c.case_id for c in self.val_cases]

    def load(self) -> TrainData:
        """The trial's TrainData: memory maps from the cache (or the shipped arrays)."""
        if self.arrays is not None:
            return TrainData(train=list(self.arrays[0]), val=list(self.arrays[1]), scheme=self.scheme)
        cache = CaseCache(self.cache_root)

        def get(case: Any) -> Any:
            hit = cache.lookup(case, self.preprocess)
            if hit is None:
                logger.warning("cache miss for %s in %s: preprocessing it in the trial", case.case_id, cache.root)
                hit = cache.load(case, self.preprocess)
            return hit

        return TrainData(
            train=[get(c) for c in self.train_cases], val=[get(c) for c in self.val_cases], scheme=self.scheme
        )


def prepare_data(
    spec: SearchSpec,
    root: str | Path,
    *,
    cache_root: str | Path | None = None,
    workers: int = 1,
    splits: str | Path | None = None,
    fold: int = 0,
    val_root: str | Path | None = None,
) -> DataHandle:
    """Discover, preprocess (once, into the cache) and split the cohort for every trial.

    The preprocessing is the base config's ``data.preprocess`` updated with the space's
    ``data.preprocess``; the split holds out ``data.val_fraction`` of the cases, stratified by
    tumour volume (``bratstune.data.cohort.split_train_val``, seed ``data.split_seed``), or is
    entry ``fold`` of a ``splits`` file (nnU-Net's ``splits_final.json``), or validates on a
    separate ``val_root`` cohort (:func:`bratstune.data.splits.train_val`).
    """
    root = Path(root).resolve()
    cache = CaseCache(cache_root)
    common = {**dict(spec.base_config().data.preprocess), **dict(spec.data.preprocess)}
    preprocess = preprocess_config(common)
    prepared = prepare_cohort(root, preprocess, workers=workers, cache_root=cache.root)
    variants = {}
    for name, overrides in spec.data.variants.items():  # every variant cached before any trial starts
        variant = preprocess_config({**common, **overrides})
        variants[name] = prepare_cohort(root, variant, workers=workers, cache_root=cache.root).preprocess
        if val_root is not None:
            prepare_cohort(Path(val_root).resolve(), variants[name], cache_root=cache.root)
        logger.info("preprocessing variant %s cached: %s", name, to_dict(variants[name]))
    val_cases = None
    if val_root is not None:
        val_cases = prepare_cohort(Path(val_root).resolve(), prepared.preprocess, cache_root=cache.root).cases
    split = train_val(
        prepared.cases,
        prepared.scheme,
        splits=splits,
        fold=fold,
        val_cases=val_cases,
        val_fraction=spec.data.val_fraction,
        seed=spec.data.split_seed,
    )
    by_id = {c.case_id: c for c in discover(root).cases}
    if val_root is not None:
        by_id.update({c.case_id: c for c in discover(Path(val_root).resolve()).cases})
    train_ids = [c.case_id for c in split.train]
    val_ids = [c.case_id for c in split.val]
    arrays = None
    if spec.data.share == "object_store":
        arrays = ([_in_memory(c) for c in split.train], [_in_memory(c) for c in split.val])
    logger.info(
        "data %s: %d train / %d val cases, fingerprint %s (%s)",
        root,
        len(train_ids),
        len(val_ids),
        prepared.fingerprint,
        spec.data.share,
    )
    return DataHandle(
        root=root,
        cache_root=cache.root,
        train_cases=[by_id[i] for i in train_ids],
        val_cases=[by_id[i] for i in val_ids],
        preprocess=prepared.preprocess,  # target spacing resolved for the cohort
        scheme=prepared.scheme,
        fingerprint=prepared.fingerprint,
        arrays=arrays,
        variants=variants,
        cohort_ids=[c.case_id for c in prepared.cases],
    )


def _in_memory(case: Any) -> Any:
    label = None if case.label is None else np.array(case.label)
    return replace(case, image=np.array(case.image), label=label)


def synthetic_cohort(
    *,
    cases: int = 16,
    shape: Sequence[int] | None = (64, 64, 48),
    anatomy: str = "procedural",
    challenge: str = "GLI",
    seed: int = 0,
    root: str | Path | None = None,
) -> Path:
    """A synthetic cohort under ``bratstune.paths.data_dir()``, generated on first use.

    The folder name encodes the arguments; a ``.complete`` marker makes reuse safe after an
    interrupted generation.
    """
    grid = "x".join(str(int(s)) for s in shape) if shape else "default"
    name = f"synthetic-{challenge}-{cases}-{grid}-{anatomy}-s{seed}"
    folder = Path(root) if root is not None else paths.data_dir() / name
    marker = folder / ".complete"
    if not marker.is_file():
        generate_cohort(
            folder, challenge=challenge, cases=cases, shape=tuple(shape) if shape else None, anatomy=anatomy, seed=seed
        )
        marker.write_text("ok\n")
    return folder


def job_cohort(data: str | Path | None, *, smoke: bool, cases: int | None = None, smoke_cases: int = 8) -> Path:
    """The cohort a job runs on: ``data`` when given, else a synthetic GLI cohort.

    The synthetic one has ``cases`` cases (default ``smoke_cases`` for a smoke test, else 16), at
    48x48x32 voxels for a smoke test and 64x64x48 otherwise.
    """
    if data is not None:
        return Path(data)
    count = cases or (smoke_cases if smoke else 16)
    return synthetic_cohort(cases=count, shape=(48, 48, 32) if smoke else (64, 64, 48))
