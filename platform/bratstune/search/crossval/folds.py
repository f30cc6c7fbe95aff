"""Stage 1, folds: the cohort preprocessed once and cut into k folds stratified by tumour volume.

The cohort is preprocessed once into the cache (``bratstune.data.cohort.prepare_cohort``) and
cut into ``k`` folds (``bratstune.data.sampling.stratified_folds``); fold ``i`` trains on the
other folds and holds its own cases out. Each fold becomes a
:class:`~bratstune.search.data.DataHandle`, the same handle a search trial receives.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bratstune.data.cache import CaseCache
from bratstune.data.cohort import PreparedCohort, prepare_cohort, preprocess_config
from bratstune.data.layout import discover
from bratstune.data.sampling import stratified_folds, tumour_volume
from bratstune.errors import ConfigError
from bratstune.search.data import DataHandle
from bratstune.training.config import TrainConfig

__all__ = ["FoldPlan", "make_folds", "plan_folds"]


def make_folds(cases: Sequence[Any], k: int, *, seed: int = 0) -> list[list[int]]:
    """Held-out case indices of each fold, stratified by tumour volume."""
    volumes = [tumour_volume(c.label, c.spacing) for c in cases]
    return [[int(i) for i in val] for _, val in stratified_folds(volumes, k, seed=seed)]


@dataclass
class FoldPlan:
    """The cohort cut into folds: what every later stage reads.

    Attributes:
        prepared: the preprocessed cohort (cases, scheme, fingerprint, challenge).
        held_out: per fold, the indices (into ``prepared.cases``) of its held-out cases.
        handles: per fold, the trial's data (train = the other folds, val = the held-out cases).
        challenge: the BraTS challenge (lesion-wise rules), upper case, or ``None`` when unknown.
    """

    prepared: PreparedCohort
    held_out: list[list[int]]
    handles: list[DataHandle]
    challenge: str | None

    @property
    def k(self) -> int:
        return len(self.held_out)

    @property
    def scheme(self) -> Any:
        return self.prepared.scheme

    @property
    def fold_ids(self) -> list[list[str]]:
        """Case ids per fold (``folds.json``)."""
        return [[self.prepared.cases[i].case_id for i in val] for val in self.held_out]

    def held_out_cases(self, fold: int) -> list[Any]:
        """The preprocessed cases fold ``fold`` holds out."""
        return [self.prepared.cases[i] for i in self.held_out[fold]]

    def write(self, out_dir: Path) -> None:
        """``<out>/folds.json``: case ids per fold."""
        ids = {f"fold{i}": ids for i, ids in enumerate(self.fold_ids)}
        (out_dir / "folds.json").write_text(json.dumps(ids, indent=1))


def plan_folds(
    config: TrainConfig,
    data_root: str | Path,
    *,
    k: int,
    seed: int = 0,
    cache_root: str | Path | None = None,
    workers: int = 1,
) -> FoldPlan:
    """Preprocess ``data_root`` once (``config.data.preprocess``) and cut it into ``k`` folds.

    Raises:
        ConfigError: fewer labelled cases than folds.
    """
    data_root = Path(data_root).resolve()
    cache = CaseCache(cache_root)
    preprocess = preprocess_config(dict(config.data.preprocess))
    prepared = prepare_cohort(data_root, preprocess, workers=workers, cache_root=cache.root)
    if len(prepared.cases) < max(k, 2):
        raise ConfigError(f"--folds {k}: the cohort has only {len(prepared.cases)} labelled case(s)")
    held_out = make_folds(prepared.cases, k, seed=seed)
    by_id = {c.case_id: c for c in discover(data_root).cases}
    handles = []
    for val in held_out:
        held = set(val)
        handles.append(
            DataHandle(
                root=data_root,
                cache_root=cache.root,
                train_cases=[by_id[c.case_id] for i, c in enumerate(prepared.cases) if i not in held],
                val_cases=[by_id[prepared.cases[i].case_id] for i in val],
                preprocess=preprocess,
                scheme=prepared.scheme,
                fingerprint=prepared.fingerprint,
            )
        )
    challenge = config.challenge or prepared.challenge or None
    return FoldPlan(prepared, held_out, handles, challenge.upper() if challenge else None)
