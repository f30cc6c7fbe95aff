"""Stage 1, folds: the cohort preprocessed once; a gate split kept out; k folds with their own epoch selection.

Which case does what, decided here once and recorded (``folds.json``, ``splits_final.json``,
``cases.json``, :class:`~bratstune.data.splits.CaseRecord` per fold)::

    cohort ─┬─ gate split (gate_fraction, or gate_cases)     never seen by the CV; the promotion gate's cases
            └─ CV cases ─ k folds (stratified by tumour volume, or a splits file)
                 fold i: held out  = fold i's cases                   predicted once (out-of-fold)
                         selection = inner_val_fraction of the rest   choose fold i's epoch (selection: inner)
                         trained   = the rest                         fit fold i's weights

With ``selection: fixed`` no case selects an epoch: the fold trains on every non-held-out CV
case for the config's epochs and keeps the last weights. Either way the held-out cases of fold i
never reach its ``fit`` (its :class:`~bratstune.search.data.DataHandle` holds only ``trained``
and ``selection``); the out-of-fold probabilities are written from a separate handle.

A splits file (nnU-Net ``splits_final.json``) fixes the folds: entry i's ``val`` is fold i's
held-out set; its ``train`` list must be exactly the other folds' cases. Cohort cases the file
does not mention become the gate split (unless ``gate_cases`` names it).

A separate validation folder can be the gate split instead (``gate_data``): then every case of the
cohort is cross-validated and the gate cases are the labelled cases of that folder (no case id
may be in both).
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
from bratstune.data.splits import CaseRecord, Split, check_known, load_splits, write_json, write_splits
from bratstune.errors import ConfigError, DataError
from bratstune.search.data import DataHandle
from bratstune.training.config import TrainConfig

__all__ = ["FoldPlan", "draw_gate", "inner_split", "make_folds", "plan_folds", "read_gate_cases"]


def make_folds(cases: Sequence[Any], k: int, *, seed: int = 0) -> list[list[int]]:
    """Held-out case indices of each fold, stratified by tumour volume."""
    volumes = [tumour_volume(c.label, c.spacing) for c in cases]
    return [[int(i) for i in val] for _, val in stratified_folds(volumes, k, seed=seed)]


def _fraction_split(cases: Sequence[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(rest, drawn)`` indices: about ``fraction`` of ``cases`` drawn, stratified by tumour volume."""
    k = min(max(2, int(round(1.0 / fraction))), len(cases))
    volumes = [tumour_volume(c.label, c.spacing) for c in cases]
    rest, drawn = stratified_folds(volumes, k, seed=seed)[0]
    return [int(i) for i in rest], [int(i) for i in drawn]


def draw_gate(cases: Sequence[Any], fraction: float, *, seed: int = 0) -> list[int]:
    """Indices of the gate split: about ``fraction`` of ``cases`` (0: none), stratified by tumour volume."""
    if fraction <= 0.0:
        return []
    return _fraction_split(cases, fraction, seed + 7919)[1]  # its own stream: not fold 0 of the CV


def inner_split(cases: Sequence[Any], fraction: float, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(trained, selection)`` indices into ``cases``: the inner validation split of one fold.

    Raises:
        ConfigError: fewer than 2 cases (nothing left to train or to select on).
    """
    if len(cases) < 2:
        raise ConfigError(
            f"selection: inner needs >= 2 training cases per fold, got {len(cases)}; use selection: fixed or fewer folds"
        )
    return _fraction_split(cases, fraction, seed)


def read_gate_cases(path: str | Path) -> list[str]:
    """Gate case ids from a JSON file: a list of ids, or ``{"gate": [ids]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot read the gate cases ({exc})") from None
    if isinstance(data, dict):
        data = data.get("gate")
    if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
        raise DataError(path, 'expected a JSON list of case ids (or {"gate": [ids]})')
    return list(data)


@dataclass
class FoldPlan:
    """The cohort cut into a gate split and folds: what every later stage reads.

    Attributes:
        prepared: the preprocessed cohort (cases, scheme, fingerprint, challenge).
        held_out: per fold, the indices (into ``prepared.cases``) of its held-out cases.
        handles: per fold, the data ``fit`` sees (train = ``trained``, val = ``selection``).
        held_out_handles: per fold, its held-out cases (as ``val``), for the out-of-fold probabilities.
        challenge: the BraTS challenge (lesion-wise rules), upper case, or ``None`` when unknown.
        gate: indices of the gate split (never used by the CV).
        trained, selection: per fold, indices of the cases it trains on and chooses its epoch on.
        selection_mode: ``inner`` or ``fixed``.
        gate_root: a separate folder holding the gate cases (``gate_external`` their ids), or ``None``.
    """

    prepared: PreparedCohort
    held_out: list[list[int]]
    handles: list[DataHandle]
    challenge: str | None
    gate: list[int]
    trained: list[list[int]]
    selection: list[list[int]]
    held_out_handles: list[DataHandle]
    selection_mode: str = "inner"
    gate_root: Path | None = None
    gate_external: list[str] | None = None

    @property
    def k(self) -> int:
        return len(self.held_out)

    @property
    def scheme(self) -> Any:
        return self.prepared.scheme

    def ids(self, indices: Sequence[int]) -> list[str]:
        return [self.prepared.cases[i].case_id for i in indices]

    @property
    def fold_ids(self) -> list[list[str]]:
        """Held-out case ids per fold (``folds.json``)."""
        return [self.ids(val) for val in self.held_out]

    @property
    def gate_ids(self) -> list[str]:
        """The gate split's case ids (in the cohort, or in the separate ``gate_root``)."""
        return sorted(self.gate_external) if self.gate_external is not None else self.ids(self.gate)

    @property
    def cv_ids(self) -> list[str]:
        """Every case the CV uses (all folds' held-out cases)."""
        return sorted(c for fold in self.fold_ids for c in fold)

    def fold_of(self) -> dict[str, int]:
        """``{case_id: fold}`` of the CV cases."""
        return {c: i for i, fold in enumerate(self.fold_ids) for c in fold}

    def held_out_cases(self, fold: int) -> list[Any]:
        """The preprocessed cases fold ``fold`` holds out."""
        return [self.prepared.cases[i] for i in self.held_out[fold]]

    def fold_record(self, fold: int) -> CaseRecord:
        """What fold ``fold``'s model trained and selected on (its decode tuning is added later)."""
        return CaseRecord(
            trained=self.ids(self.trained[fold]),
            selected=self.ids(self.selection[fold]),
            gate=self.gate_ids,
            extra={"fold": fold, "held_out": self.fold_ids[fold], "selection_mode": self.selection_mode},
        )

    def splits(self) -> list[Split]:
        """The folds in nnU-Net's shape: train = the other folds' cases, val = the held-out ones."""
        out = []
        for i, val in enumerate(self.fold_ids):
            train = [c for j, fold in enumerate(self.fold_ids) if j != i for c in fold]
            out.append(Split(tuple(sorted(train)), tuple(sorted(val))))
        return out

    def write(self, out_dir: Path) -> None:
        """``folds.json`` (held-out ids per fold), ``splits_final.json`` and ``gate.json``."""
        write_json(out_dir / "folds.json", {f"fold{i}": ids for i, ids in enumerate(self.fold_ids)})
        write_splits(out_dir / "splits_final.json", self.splits())
        write_json(out_dir / "gate.json", {"gate": self.gate_ids})


def _external_gate(folder: Path, cohort_ids: list[str]) -> list[str]:
    """The labelled case ids of a separate gate folder (none of them in the cohort)."""
    ids = sorted(c.case_id for c in discover(folder).cases if c.label is not None)
    if not ids:
        raise DataError(folder, "gate_data: no labelled case (the gate needs labels)")
    both = sorted(set(ids) & set(cohort_ids))
    if both:
        raise DataError(folder, f"gate_data: case(s) also in the cross-validated cohort: {', '.join(both[:5])}")
    return ids


def _folds_from_file(path: str | Path, ids: list[str], gate: set[str]) -> list[list[int]]:
    """Held-out indices per fold from a splits file (checked against the cohort and the gate)."""
    splits = load_splits(path)
    if len(splits) < 2:
        raise DataError(Path(path), f"cross-validation needs >= 2 folds, the file has {len(splits)}")
    index = {c: i for i, c in enumerate(ids)}
    held = [set(s.val) for s in splits]
    cv = set().union(*held)
    for i, split in enumerate(splits):
        check_known(list(split.train) + list(split.val), index, path, f"[{i}]")
        others = set().union(*(h for j, h in enumerate(held) if j != i))
        if held[i] & others:
            raise DataError(Path(path), f"[{i}].val: case(s) held out by two folds: {sorted(held[i] & others)[:5]}")
        if split.train and set(split.train) != others:
            raise DataError(Path(path), f"[{i}].train: expected exactly the other folds' val cases")
    if cv & gate:
        raise DataError(Path(path), f"case(s) in both the folds and the gate split: {sorted(cv & gate)[:5]}")
    return [sorted(index[c] for c in split.val) for split in splits]


def _cut(cases: list[Any], k: int, seed: int, splits: str | Path | None, gate_fraction: float, gate_file: Any):
    """``(gate, held_out)`` indices into ``cases``."""
    ids = [c.case_id for c in cases]
    if gate_file is not None:
        gate_ids = read_gate_cases(gate_file)
        check_known(gate_ids, ids, gate_file, "gate cases")
        gate = sorted(ids.index(c) for c in gate_ids)
    elif splits is not None:
        mentioned = {c for s in load_splits(splits) for c in s.train + s.val}
        gate = [i for i, c in enumerate(ids) if c not in mentioned]
    else:
        gate = sorted(draw_gate(cases, gate_fraction, seed=seed))
    if splits is not None:
        return gate, _folds_from_file(splits, ids, {ids[i] for i in gate})
    rest = [i for i in range(len(cases)) if i not in set(gate)]
    if len(rest) < max(k, 2):
        raise ConfigError(
            f"--folds {k}: only {len(rest)} labelled case(s) left after the {len(gate)}-case gate split "
            f"(of {len(cases)}); lower folds or gate_fraction"
        )
    return gate, [sorted(rest[j] for j in fold) for fold in make_folds([cases[i] for i in rest], k, seed=seed)]


def plan_folds(
    config: TrainConfig,
    data_root: str | Path,
    *,
    k: int,
    seed: int = 0,
    cache_root: str | Path | None = None,
    workers: int = 1,
    selection: str = "inner",
    inner_val_fraction: float = 0.2,
    gate_fraction: float = 0.0,
    gate_cases: str | Path | None = None,
    splits: str | Path | None = None,
    gate_data: str | Path | None = None,
) -> FoldPlan:
    """Preprocess ``data_root`` once, keep the gate split out, cut the rest into ``k`` folds.

    Raises:
        ConfigError: fewer labelled CV cases than folds, too few training cases for an inner split.
        DataError: a splits or gate file that names unknown cases or overlaps.
    """
    data_root = Path(data_root).resolve()
    cache = CaseCache(cache_root)
    preprocess = preprocess_config(dict(config.data.preprocess))
    prepared = prepare_cohort(data_root, preprocess, workers=workers, cache_root=cache.root)
    if len(prepared.cases) < max(k, 2):
        raise ConfigError(f"--folds {k}: the cohort has only {len(prepared.cases)} labelled case(s)")
    external = None
    if gate_data is not None:
        external = _external_gate(Path(gate_data).resolve(), [c.case_id for c in prepared.cases])
        gate_fraction, gate_cases = 0.0, None
    gate, held_out = _cut(prepared.cases, k, seed, splits, gate_fraction, gate_cases)
    by_id = {c.case_id: c for c in discover(data_root).cases}

    def handle(train: list[int], val: list[int]) -> DataHandle:
        return DataHandle(
            root=data_root,
            cache_root=cache.root,
            train_cases=[by_id[prepared.cases[i].case_id] for i in train],
            val_cases=[by_id[prepared.cases[i].case_id] for i in val],
            preprocess=prepared.preprocess,  # target spacing resolved for the cohort
            scheme=prepared.scheme,
            fingerprint=prepared.fingerprint,
        )

    trained, selected, handles, held_handles = [], [], [], []
    for fold, val in enumerate(held_out):
        rest = [i for other, idx in enumerate(held_out) if other != fold for i in idx]
        if selection == "inner":
            inner_train, inner_val = inner_split(
                [prepared.cases[i] for i in rest], inner_val_fraction, seed=seed + fold
            )
            train, sel = sorted(rest[j] for j in inner_train), sorted(rest[j] for j in inner_val)
        else:
            train, sel = sorted(rest), []
        trained.append(train)
        selected.append(sel)
        handles.append(handle(train, sel))
        held_handles.append(handle([], val))
    challenge = config.challenge or prepared.challenge or None
    return FoldPlan(
        prepared=prepared,
        held_out=held_out,
        handles=handles,
        challenge=challenge.upper() if challenge else None,
        gate=gate,
        trained=trained,
        selection=selected,
        held_out_handles=held_handles,
        selection_mode=selection,
        gate_root=Path(gate_data).resolve() if gate_data is not None else None,
        gate_external=external,
    )
