"""Explicit splits: nnU-Net's ``splits_final.json`` shape, read, checked and written.

A splits file is a JSON list with one entry per fold; each entry names the case ids the fold
trains on and the ones it validates on (nnU-Net v2's ``splits_final.json``)::

    [
      {"train": ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"], "val": ["BraTS-GLI-00003-000"]},
      {"train": ["BraTS-GLI-00001-000", "BraTS-GLI-00003-000"], "val": ["BraTS-GLI-00002-000"]}
    ]

``bratstune train --splits FILE [--fold I]`` trains on entry ``I``; cross-validation uses every
entry as one fold (``val`` = the fold's held-out cases); a search uses entry ``fold`` of its
``prepare_data(..., splits=FILE)``. :func:`write_splits` writes the same shape (atomically), so a
split drawn by bratstune can be replayed by nnU-Net and the other way round.

:class:`CaseRecord` is what a trained model records about its cases, so that "held out" can be
checked later (the promotion gate does): the cases it **trained** on, the cases that
**selected** its epoch (or none: a fixed number of epochs), the cases its decode settings were
**tuned** on, and the held-out **gate** cases it was registered with. It is written as
``cases.json`` next to models and on their MLflow runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bratstune.data.cohort import TrainData, split_train_val
from bratstune.errors import ConfigError, DataError

__all__ = [
    "CASES_FILE",
    "CaseRecord",
    "Split",
    "check_known",
    "load_splits",
    "split_of",
    "train_val",
    "write_json",
    "write_splits",
]

#: The file name of a :class:`CaseRecord` (next to a model, and as an MLflow artifact).
CASES_FILE = "cases.json"


@dataclass(frozen=True)
class Split:
    """One fold of a splits file: the case ids it trains on and the ones it validates on."""

    train: tuple[str, ...]
    val: tuple[str, ...]

    def to_json(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val)}


def _ids(value: Any, path: Path, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DataError(path, f"{where}: expected a list of case-id strings, got {type(value).__name__}")
    if len(set(value)) != len(value):
        dup = sorted({v for v in value if value.count(v) > 1})
        raise DataError(path, f"{where}: case id(s) listed twice: {', '.join(dup[:5])}")
    return tuple(value)


def load_splits(path: str | Path) -> list[Split]:
    """Read and check a splits file (see the module docstring).

    Raises:
        DataError: not JSON, not a non-empty list of ``{"train": [...], "val": [...]}``, an
            unknown key, a case listed twice, or a case in both ``train`` and ``val`` of one fold.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(path, f"cannot read the splits file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not data:
        raise DataError(path, 'expected a non-empty list of {"train": [ids], "val": [ids]} (nnU-Net splits_final.json)')
    splits = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise DataError(path, f'[{i}]: expected {{"train": [ids], "val": [ids]}}, got {type(entry).__name__}')
        unknown = sorted(set(entry) - {"train", "val"})
        if unknown or "val" not in entry:
            raise DataError(path, f"[{i}]: expected the keys 'train' and 'val', got {sorted(entry)}")
        train = _ids(entry.get("train", []), path, f"[{i}].train")
        val = _ids(entry["val"], path, f"[{i}].val")
        both = sorted(set(train) & set(val))
        if both:
            raise DataError(path, f"[{i}]: case(s) in both train and val: {', '.join(both[:5])}")
        splits.append(Split(train, val))
    return splits


def check_known(ids: Iterable[str], known: Iterable[str], source: str | Path, where: str) -> None:
    """Raise :class:`DataError` naming ``source`` when ``ids`` names a case not in ``known``."""
    missing = sorted(set(ids) - set(known))
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataError(
            Path(source), f"{where}: case(s) not in the cohort: {', '.join(missing[:5])}{more}; check the case ids"
        )


def split_of(splits: Sequence[Split], fold: int, path: str | Path) -> Split:
    """Entry ``fold`` of ``splits`` (``DataError`` naming the file when out of range)."""
    if not 0 <= int(fold) < len(splits):
        raise DataError(Path(path), f"--fold {fold}: the file has {len(splits)} fold(s) (0..{len(splits) - 1})")
    return splits[int(fold)]


def train_val(
    cases: Sequence[Any],
    scheme: Any,
    *,
    splits: str | Path | None = None,
    fold: int = 0,
    val_cases: Sequence[Any] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> TrainData:
    """The train / validation cases of one run: from a splits file, a separate validation cohort, or drawn.

    Args:
        cases: the labelled (preprocessed) cases of the training cohort.
        splits: a splits file; entry ``fold`` names the train and val ids (all must be in ``cases``).
        val_cases: the cases of a separate validation cohort (then every case of ``cases`` trains).
        val_fraction, seed: otherwise, hold out about ``val_fraction``, stratified by tumour volume.

    Raises:
        ConfigError: both ``splits`` and ``val_cases``.
        DataError: the splits file names unknown cases; a validation case id is also a training one.
    """
    cases = list(cases)
    if splits is not None and val_cases is not None:
        raise ConfigError("give either a splits file or a separate validation folder, not both")
    if splits is not None:
        chosen = split_of(load_splits(splits), fold, splits)
        by_id = {c.case_id: c for c in cases}
        check_known(list(chosen.train) + list(chosen.val), by_id, splits, f"[{fold}]")
        train = list(chosen.train) or [c for c in by_id if c not in set(chosen.val)]
        return TrainData(train=[by_id[c] for c in train], val=[by_id[c] for c in chosen.val], scheme=scheme)
    if val_cases is not None:
        both = sorted({c.case_id for c in cases} & {c.case_id for c in val_cases})
        if both:
            raise DataError(None, f"validation folder: case(s) also in the training folder: {', '.join(both[:5])}")
        return TrainData(train=cases, val=list(val_cases), scheme=scheme)
    return split_train_val(cases, scheme, val_fraction=val_fraction, seed=seed)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
    return path


def write_splits(path: str | Path, splits: Sequence[Split]) -> Path:
    """Write ``splits`` in nnU-Net's ``splits_final.json`` shape (atomically)."""
    return write_json(path, [s.to_json() for s in splits])


@dataclass
class CaseRecord:
    """Which cases a model used, by role (see the module docstring).

    Attributes:
        trained: cases whose labels the weights were fitted on.
        selected: cases that chose the epoch (empty: a fixed number of epochs, no selection).
        tuned: cases the decode settings (thresholds, post-processing, ensemble selection) were tuned on.
        gate: held-out cases the model was registered with, for the promotion gate.
        extra: anything else worth keeping (e.g. per-fold records of a cross-validation).
    """

    trained: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    gate: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def used(self) -> set[str]:
        """Every case the model trained, selected or tuned on (never held out for it)."""
        return set(self.trained) | set(self.selected) | set(self.tuned)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "trained": sorted(self.trained),
            "selected": sorted(self.selected),
            "tuned": sorted(self.tuned),
            "gate": sorted(self.gate),
        }
        out.update(self.extra)
        return out

    def dumps(self) -> str:
        """Compact JSON (what an ensemble's ``lineage["cases"]`` holds)."""
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str, *, source: str | Path | None = None) -> CaseRecord:
        """From :meth:`to_json`'s mapping (or its JSON text).

        Raises:
            DataError: not a mapping, or a role that is not a list of case ids.
        """
        where = Path(source) if source is not None else None
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise DataError(where, f"case record is not JSON ({exc.msg})") from None
        if not isinstance(data, Mapping):
            raise DataError(where, f"case record: expected a mapping, got {type(data).__name__}")
        roles = {}
        for role in ("trained", "selected", "tuned", "gate"):
            value = data.get(role, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise DataError(where, f"case record: '{role}' must be a list of case ids")
            roles[role] = list(value)
        extra = {k: v for k, v in data.items() if k not in roles}
        return cls(**roles, extra=extra)

    def write(self, path: str | Path) -> Path:
        """``cases.json`` (atomically)."""
        return write_json(path, self.to_json())
