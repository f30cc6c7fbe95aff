"""Ensemble selection across cross-validated configurations, cross-fitted, and the ensemble it deploys.

::

    outcomes = [cross_validate(cfg, data, spec) for cfg in top_configs]      # same folds, same gate
    candidates, references = candidates_from_cv([o.out_dir for o in outcomes], data)
    result = crossfit_selection(candidates, references, scheme, challenge="GLI", method="greedy",
                                decode_spec=threshold_spec(None, "GLI", 50))
    result.oos["dice_lesion_mean"]        # honest: fold k blended and decoded by choices made on the others
    ensemble = build_selected_ensemble(result, candidates, ...)

Members are **configurations** (see :mod:`bratstune.search.selection`): each CV run is one
candidate whose out-of-fold probabilities cover every CV case, case i coming from the fold model
that held i out. All runs must share the fold assignment and the gate split (``folds.json``,
``gate.json``; the same ``seed``, ``gate_fraction`` and cohort, or the same splits file).

Cross-fitting (:mod:`~bratstune.search.crossval.crossfit`): for each fold k, the selector picks
weights on the other folds' cases; decode settings are tuned (``decode_spec``) on that blend of
the other folds' cases; fold k's cases are blended with those weights, decoded with those
settings and scored once. The pooled per-case scores are the out-of-sample estimate of
"select + tune". The deployed blend and decode are chosen on every CV case (in-sample figure
recorded beside it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bratstune.config_utils import load_yaml
from bratstune.data.cohort import prepare_cohort, preprocess_config
from bratstune.data.splits import CaseRecord
from bratstune.ensemble.member import Member
from bratstune.ensemble.package import Ensemble
from bratstune.errors import ConfigError, DataError
from bratstune.inference.decode import DecodeSettings
from bratstune.search.crossval.crossfit import crossfit, per_case, pool_metrics
from bratstune.search.crossval.fold_trials import BEST_DIR, FOLDS_DIR
from bratstune.search.crossval.oof import OOF_DIR
from bratstune.search.selection import Candidate, Selection, blended_cases, select
from bratstune.search.threshold_space import ThresholdSpec
from bratstune.search.thresholds import search_thresholds

__all__ = [
    "CrossFittedSelection",
    "build_selected_ensemble",
    "candidates_from_cv",
    "crossfit_selection",
    "log_selection",
]


class _OofProbs(Mapping[str, np.ndarray]):
    """``{case_id: probabilities}`` read lazily (memory-mapped) from a CV's ``oof/`` folder."""

    def __init__(self, folder: Path, ids: Sequence[str]) -> None:
        self.folder, self.ids = folder, list(ids)

    def __getitem__(self, case_id: str) -> np.ndarray:
        path = self.folder / f"{case_id}.npy"
        if case_id not in self.ids or not path.is_file():
            raise KeyError(case_id)
        return np.load(path, mmap_mode="r")

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise DataError(path, "missing: not a finished cross-validation output folder")
    return json.loads(path.read_text())


def candidates_from_cv(
    out_dirs: Sequence[str | Path], data_root: str | Path, *, cache_root: str | Path | None = None
) -> tuple[list[Candidate], list[list[Any]]]:
    """One :class:`Candidate` per CV output folder, and the CV cases per fold (with labels).

    Args:
        out_dirs: CV output folders (``CVOutcome.out_dir``), cross-validated on the same folds.
        data_root: the cohort they were cross-validated on (labels come from its cache).

    Returns:
        ``(candidates, references)``: ``references[k]`` are fold k's preprocessed cases
        (``case_id``, ``label``, ``spacing``), the grid of the out-of-fold probabilities.

    Raises:
        ConfigError: the folders do not share their folds or their gate split.
    """
    dirs = [Path(d) for d in out_dirs]
    if not dirs:
        raise ConfigError("ensemble selection needs at least one cross-validation output folder")
    folds, gate = _read(dirs[0] / "folds.json"), _read(dirs[0] / "gate.json")
    for d in dirs[1:]:
        if _read(d / "folds.json") != folds or _read(d / "gate.json") != gate:
            raise ConfigError(f"{d}: its folds or gate split differ from {dirs[0]}'s; cross-validate on the same split")
    fold_ids = [list(folds[f"fold{k}"]) for k in range(len(folds))]
    ids = [c for fold in fold_ids for c in fold]
    preprocess = _preprocess_of(dirs[0])
    for d in dirs[1:]:
        if _preprocess_of(d) != preprocess:
            raise ConfigError(f"{d}: its data.preprocess differs from {dirs[0]}'s (the probabilities' grids differ)")
    prepared = prepare_cohort(Path(data_root), preprocess_config(preprocess), cache_root=cache_root)
    by_id = {c.case_id: c for c in prepared.cases}
    missing = [c for c in ids if c not in by_id]
    if missing:
        raise DataError(Path(data_root), f"CV case(s) not in this cohort: {missing[:5]}")
    candidates = [
        Candidate(
            name=d.name,
            probs=_OofProbs(d / OOF_DIR, ids),
            source=[d / FOLDS_DIR / f"fold{k}" / BEST_DIR for k in range(len(fold_ids))],
        )
        for d in dirs
    ]
    return candidates, [[by_id[c] for c in fold] for fold in fold_ids]


def _preprocess_of(out_dir: Path) -> dict[str, Any]:
    """The preprocessing of a CV's fold models (their saved ``config.yaml``)."""
    config = load_yaml(out_dir / FOLDS_DIR / "fold0" / BEST_DIR / "config.yaml")
    return dict((config.get("data") or {}).get("preprocess") or {})


@dataclass
class CrossFittedSelection:
    """Cross-fitted selection (+ decode tuning) and the deployed choice.

    Attributes:
        method: the selector (``greedy``, ``equal``, ``best_n``).
        selection, settings: the deployed blend and decode, chosen on every CV case.
        fold_selections, fold_settings: per fold, the choices made on the other folds.
        case_metrics: per case, its cross-fitted metrics; ``oos``: pooled.
        in_sample: the deployed blend and decode on the cases they were chosen on.
    """

    method: str
    selection: Selection
    settings: DecodeSettings
    fold_selections: list[Selection]
    fold_settings: list[DecodeSettings]
    case_metrics: dict[str, dict[str, float]]
    oos: dict[str, float]
    in_sample: dict[str, float]
    fold_tuned_on: list[list[str]] = field(default_factory=list)


def crossfit_selection(
    candidates: Sequence[Candidate],
    references: Sequence[Sequence[Any]],
    scheme: Any,
    *,
    challenge: str | None,
    method: str = "greedy",
    decode_spec: ThresholdSpec | None = None,
    decode: DecodeSettings | None = None,
    metric: str = "dice_lesion_mean",
    mode: str = "max",
    max_steps: int = 10,
    n: int = 5,
) -> CrossFittedSelection:
    """Cross-fitted ensemble selection, then decode tuning, then the deployed choice (module docstring).

    Args:
        candidates: the library (each covering every case of ``references``).
        references: per fold, its cases (``case_id``, ``label``, ``spacing``).
        method: ``greedy`` (Caruana), ``equal`` (all, equal weights) or ``best_n`` (voxel Dice top n).
        decode_spec: tune thresholds / post-processing on each chosen blend (``None``: use ``decode``).
        decode: the decode selection scores with (default 0.5, no post-processing).
    """
    regions = tuple(scheme.regions)
    lesion = bool(challenge)
    options = {"challenge": challenge, "decode": decode, "metric": metric, "mode": mode, "max_steps": max_steps, "n": n}

    def fit(cases: list[Any], k: int) -> tuple[Selection, DecodeSettings]:
        chosen = select(method, candidates, cases, scheme, **options)
        if decode_spec is None:
            return chosen, decode or DecodeSettings()
        blend = blended_cases(candidates, chosen.weights, cases)
        tuned = search_thresholds(decode_spec, blend, scheme, challenge=challenge, num_samples=decode_spec.num_samples)
        return chosen, tuned.best.with_thresholds(scheme.train_regions)

    fitted = crossfit(references, fit)
    case_metrics: dict[str, dict[str, float]] = {}
    for (chosen, settings), fold in zip(fitted, references):
        blend = blended_cases(candidates, chosen.weights, fold)
        case_metrics.update(per_case(blend, scheme, settings, challenge=challenge, lesion=lesion))
    everything = [c for fold in references for c in fold]
    selection, settings = fit(everything, -1)
    in_sample = pool_metrics(
        per_case(
            blended_cases(candidates, selection.weights, everything),
            scheme,
            settings,
            challenge=challenge,
            lesion=lesion,
        ),
        regions,
    )
    ids = [[c.case_id for c in fold] for fold in references]
    return CrossFittedSelection(
        method=method,
        selection=selection,
        settings=settings,
        fold_selections=[s for s, _ in fitted],
        fold_settings=[d for _, d in fitted],
        case_metrics=case_metrics,
        oos=pool_metrics(case_metrics, regions),
        in_sample=in_sample,
        fold_tuned_on=[[c for j, fold in enumerate(ids) if j != k for c in fold] for k in range(len(ids))],
    )


def _case_record(result: CrossFittedSelection, candidates: Sequence[Candidate], gate: Sequence[str]) -> CaseRecord:
    """What the deployed ensemble used: its fold models' training/selection cases, every CV case for tuning."""
    trained: set[str] = set()
    selected: set[str] = set()
    for cand in candidates:
        if cand.name not in result.selection.members:
            continue
        for folder in cand.source or []:
            path = Path(folder).parent / "cases.json"
            if not path.is_file():
                raise DataError(path, "missing: the fold's case record (a CV output folder from this version)")
            record = CaseRecord.from_json(path.read_text(), source=path)
            trained |= set(record.trained)
            selected |= set(record.selected)
    tuned = sorted(c for fold in result.fold_tuned_on for c in fold)
    return CaseRecord(sorted(trained), sorted(selected), sorted(set(tuned)), list(gate), {"selection": result.method})


def build_selected_ensemble(
    result: CrossFittedSelection,
    candidates: Sequence[Candidate],
    *,
    scheme: Any,
    challenge: str | None,
    gate: Sequence[str],
    lineage: Mapping[str, Any] | None = None,
    inference: Mapping[str, Any] | None = None,
) -> Ensemble:
    """The deployed blend as a packaged ensemble: each chosen configuration's fold models, ``count`` times each.

    Weights are realised by repeating members (the package averages its members equally; counts
    are divided by their greatest common divisor first); the
    decode is ``result.settings``; metrics ``cv/oos/...`` and ``cv/in_sample/...`` of the selection.
    """
    by = {c.name: c for c in candidates}
    counts = {n: int(w) for n, w in result.selection.weights.items() if w > 0}
    common = math.gcd(*counts.values()) if counts else 1  # {a: 4, b: 2} deploys as {a: 2, b: 1}
    members = []
    for name, count in sorted((n, w // common) for n, w in counts.items()):
        for k, folder in enumerate(by[name].source or []):
            member = Member.from_folder(folder, scheme, name=f"{name}-fold{k}")
            members.extend([member] * int(count))
    if not members:
        raise ConfigError("the selection chose no candidate with fold models (Candidate.source)")
    metrics = {f"cv/oos/{k}": v for k, v in result.oos.items()}
    metrics.update({f"cv/in_sample/{k}": v for k, v in result.in_sample.items()})
    record = _case_record(result, candidates, gate)
    return Ensemble.from_members(
        members,
        scheme=scheme,
        challenge=challenge,
        inference=inference or None,
        decode=result.settings,
        lineage={
            **dict(lineage or {}),
            "cases": record.dumps(),
            "selection": json.dumps({"method": result.method, "weights": result.selection.weights}),
        },
        metrics=metrics,
    )


def log_selection(client: MlflowClient, run_id: str, result: CrossFittedSelection) -> None:
    """``selection/<method>/oos/<m>`` and ``.../in_sample/<m>`` metrics and ``selection/<method>.json``."""
    prefix = f"selection/{result.method}"
    values = {f"{prefix}/oos/{k}": v for k, v in result.oos.items()}
    values.update({f"{prefix}/in_sample/{k}": v for k, v in result.in_sample.items()})
    metrics = [Metric(k, float(v), 0, 0) for k, v in values.items() if np.isfinite(v)]
    client.log_batch(run_id, metrics=metrics)
    payload = {
        "method": result.method,
        "weights": result.selection.weights,
        "history": result.selection.history,
        "fold_weights": [s.weights for s in result.fold_selections],
        "oos": result.oos,
        "in_sample": result.in_sample,
    }
    client.log_text(run_id, json.dumps(payload, indent=1), f"{prefix}.json")
