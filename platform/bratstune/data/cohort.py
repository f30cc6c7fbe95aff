"""From a cohort folder to :class:`TrainData`: discover, cache, split.

Shared by ``bratstune train`` and the jobs that call :func:`bratstune.training.fit.fit` on a folder::

    prepared = prepare_cohort(Path("data/GLI"), PreprocessConfig(), workers=2)
    data = split_train_val(prepared.cases, prepared.scheme, val_fraction=0.2, seed=0)

``data.preprocess.target_spacing: null`` is resolved here, once per cohort, to the median
spacing of its cases (nnU-Net's choice; :func:`resolve_preprocess`): ``prepared.preprocess`` is the
config the cache was filled with, and the one to hand on (trials, packages).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bratstune.config_utils import from_dict
from bratstune.data.cache import CaseCache
from bratstune.data.case import Case
from bratstune.data.fingerprint import data_fingerprint
from bratstune.data.layout import default_scheme, discover
from bratstune.data.nifti import read_info
from bratstune.data.preprocess import PreprocessConfig, replace_config
from bratstune.data.resample import median_spacing, reoriented_spacing
from bratstune.data.sampling import stratified_folds, tumour_volume
from bratstune.errors import ConfigError, DataError
from bratstune.labels import check_labels

logger = logging.getLogger(__name__)

__all__ = [
    "PreparedCohort",
    "TrainData",
    "prepare_cohort",
    "preprocess_config",
    "resolve_preprocess",
    "split_train_val",
]


@dataclass
class TrainData:
    """The cases one run trains and validates on.

    Attributes:
        train: labelled ``PreprocessedCase`` objects (from ``bratstune.data.cache.CaseCache``).
        val: labelled cases for whole-volume validation (may be empty: no validation metrics).
        scheme: the ``LabelScheme`` of every label.
    """

    train: Sequence[Any]
    val: Sequence[Any]
    scheme: Any


@dataclass
class PreparedCohort:
    """Preprocessed, cached cases of one folder.

    Attributes:
        root: the cohort folder.
        cases: ``PreprocessedCase`` objects (memmaps from the cache), sorted by case id.
        scheme: the label scheme implied by the naming (the same for every case).
        challenge: the challenge named by the cases (``GLI``, ``PED`` ...), or ``None``.
        fingerprint: hash of the case ids and the preprocessing config.
        preprocess: the ``PreprocessConfig`` the cases were prepared with, its target spacing
            resolved (:func:`resolve_preprocess`).
    """

    root: Path
    cases: list[Any]
    scheme: Any
    challenge: str | None
    fingerprint: str
    preprocess: Any = None


def preprocess_config(mapping: Mapping[str, Any] | None) -> Any:
    """``data.preprocess`` of a train config as a ``PreprocessConfig`` (validated)."""

    return from_dict(PreprocessConfig, mapping or {}, where="config.data.preprocess")


def resolve_preprocess(preprocess: PreprocessConfig, cases: Sequence[Case]) -> PreprocessConfig:
    """``preprocess`` with ``target_spacing`` set: as given, else the cohort's median spacing.

    The median is taken per axis over the cases' voxel sizes after reorientation to
    ``preprocess.orientation`` (read from the headers of their first image: no voxel is decoded).
    """
    if preprocess.target_spacing is not None or not cases:
        return preprocess
    spacings = []
    for case in cases:
        info = read_info(next(iter(case.images.values())))
        spacings.append(reoriented_spacing(info.affine, preprocess.orientation))
    target = median_spacing(spacings)
    distinct = {tuple(round(v, 3) for v in s) for s in spacings}
    logger.info(
        "target spacing %s mm (%s median of %d case(s), %d distinct spacing(s))",
        "x".join(f"{v:g}" for v in target or ()),
        preprocess.orientation,
        len(spacings),
        len(distinct),
    )
    return replace_config(preprocess, target_spacing=target)


def prepare_cohort(
    root: Path, preprocess: Any, *, workers: int = 1, cache_root: Path | None = None, year: int | None = None
) -> PreparedCohort:
    """Discover the labelled cases under ``root`` and prepare them in the preprocessing cache.

    A ``target_spacing`` of ``None`` becomes the median spacing of the labelled cases first
    (:func:`resolve_preprocess`); ``PreparedCohort.preprocess`` holds the resolved config.

    Raises:
        DataError: no labelled case, cases whose naming implies different label schemes, or label
            values outside the scheme (naming the label file).
    """

    cohort = discover(root)
    labelled = [c for c in cohort.cases if c.label is not None]
    if not labelled:
        raise DataError(root, "no case with a segmentation (training needs labels)")
    skipped = len(cohort.cases) - len(labelled)
    if skipped:
        logger.warning("%s: %d case(s) without a label are not used for training", root, skipped)
    schemes = {default_scheme(c, year=year).name: default_scheme(c, year=year) for c in labelled}
    if len(schemes) > 1:
        raise DataError(root, f"cases use different label schemes {sorted(schemes)}; train on one challenge at a time")
    challenges = sorted({c.challenge for c in labelled if c.challenge})
    preprocess = resolve_preprocess(preprocess, labelled)
    cases = CaseCache(cache_root).prepare(labelled, preprocess, workers=workers)
    scheme = next(iter(schemes.values()))
    for case, prepared in zip(labelled, cases):  # a value outside the scheme would train as background
        check_labels(prepared.label, scheme, source=case.label)
    return PreparedCohort(
        root=Path(root),
        cases=cases,
        scheme=scheme,
        challenge=challenges[0] if len(challenges) == 1 else None,
        fingerprint=data_fingerprint([c.case_id for c in cases], preprocess),
        preprocess=preprocess,
    )


def split_train_val(cases: Sequence[Any], scheme: Any, *, val_fraction: float = 0.2, seed: int = 0) -> TrainData:
    """Hold out about ``val_fraction`` of the cases, stratified by tumour volume.

    Uses fold 0 of ``bratstune.data.sampling.stratified_folds`` with ``k = round(1 / val_fraction)``
    (at most the number of cases); ``val_fraction = 0`` trains on everything without validation.
    """

    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction: expected 0 <= value < 1, got {val_fraction!r}")
    cases = list(cases)
    if val_fraction == 0.0:
        return TrainData(train=cases, val=[], scheme=scheme)
    if len(cases) < 2:
        raise DataError(None, f"{len(cases)} labelled case(s): need at least 2 to hold out validation cases")
    k = min(max(2, int(round(1.0 / val_fraction))), len(cases))
    volumes = [tumour_volume(c.label, c.spacing) for c in cases]
    train_idx, val_idx = stratified_folds(volumes, k, seed=seed)[0]
    return TrainData(
        train=[cases[i] for i in np.asarray(train_idx)],
        val=[cases[i] for i in np.asarray(val_idx)],
        scheme=scheme,
    )
