"""Decode search: region thresholds and post-processing tuned on cached probabilities (no retraining).

::

    spec = load_threshold_space("search_spaces/thresholds.yaml")        # bratstune.search.threshold_space
    outcome = search_thresholds(spec, cases, scheme, challenge="GLI")    # cases: CachedCase probabilities
    outcome.best          # DecodeSettings: thresholds {WT: 0.42, ...}, post-processing {min_size: {ET: 15}, ...}
    outcome.best_values   # the best Optuna trial's flat values {"thresholds.WT": 0.42, ..., "fill_holes": True}

Each Optuna trial turns its flat values into a :class:`~bratstune.inference.decode.DecodeSettings`
(:meth:`~bratstune.inference.decode.DecodeSettings.from_values`: the flat shape exists only at
this boundary), decodes the cached per-region probabilities with it
(:meth:`~bratstune.inference.decode.DecodeSettings.decode_regions`: thresholds, then per-region
minimum lesion size and hole filling) and scores the result with the BraTS lesion-wise metrics;
only the probabilities are expensive, and they are computed once
(:func:`bratstune.search.threshold_job.cache_probabilities`, or out-of-fold in cross-validation).

Metrics: ``dice_lesion_<R>``, ``dice_<R>`` (legacy), ``hd95_lesion_<R>`` and their ``_mean``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError, DataError
from bratstune.inference.decode import DEFAULT_THRESHOLD, DecodeSettings
from bratstune.metrics import lesion_wise
from bratstune.search.params import ParamSpec
from bratstune.search.sections import make_sampler
from bratstune.search.threshold_space import METRIC, ThresholdSpec
from bratstune.training.validate import region_dice

logger = logging.getLogger(__name__)

__all__ = ["CachedCase", "ThresholdOutcome", "evaluate", "search_thresholds", "settings_mapping"]

_LESION_KEYS = {"dice_lesion": "lesionwise_dice", "dice": "legacy_dice", "hd95_lesion": "lesionwise_hd95"}


@dataclass
class CachedCase:
    """Validation probabilities of one case, kept in memory for the whole search.

    Attributes:
        probs: float16 ``(R, x, y, z)`` sigmoid per region channel (``scheme.train_regions``).
        label: uint8 reference ``(x, y, z)``.
        spacing: voxel size in mm.
    """

    case_id: str
    probs: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def settings_mapping(settings: DecodeSettings) -> dict[str, Any]:
    """The nested shape of ``best_postprocess.yaml`` and cross-validation's ``thresholds.yaml``::

        thresholds: {WT: 0.45, TC: 0.5, ET: 0.4}
        postprocess: {min_size: {WT: 100, ET: 20}, fill_holes: false}

    (``fill_holes``: one flag for every region, as the search tunes it).
    :meth:`DecodeSettings.from_mapping` reads it back.
    """
    post = settings.postprocess
    return {
        "thresholds": {r: float(v) for r, v in settings.thresholds.items()},
        "postprocess": {
            "min_size": {r: int(v) for r, v in post.min_size.items()},
            "fill_holes": bool(post.fill_holes_default),
        },
    }


def evaluate(
    cases: Sequence[CachedCase],
    scheme: Any,
    settings: DecodeSettings,
    *,
    challenge: str | None,
    lesion: bool = True,
) -> dict[str, float]:
    """Mean metrics over ``cases``: ``dice_<R>`` always; lesion-wise ones when ``lesion`` and ``challenge``.

    ``DecodeSettings()`` scores the default decode (threshold 0.5, no post-processing).
    """
    per: dict[str, list[float]] = {}
    for case in cases:
        pred = settings.decode_regions(case.probs, scheme)
        for region, value in region_dice(pred, case.label, scheme).items():
            per.setdefault(f"dice_{region}", []).append(value)
        if not (lesion and challenge):
            continue
        result = lesion_wise(pred, case.label, challenge, spacing=case.spacing)
        for region, row in result.items():
            if region not in scheme.regions or not isinstance(row, Mapping):
                continue
            for short, key in _LESION_KEYS.items():
                if short != "dice" and key in row:
                    per.setdefault(f"{short}_{region}", []).append(float(row[key]))
    out = {k: float(np.nanmean(v)) for k, v in per.items()}
    for prefix in ("dice_lesion", "dice", "hd95_lesion"):
        vals = [out[f"{prefix}_{r}"] for r in scheme.regions if f"{prefix}_{r}" in out]
        if vals:
            out[f"{prefix}_mean"] = float(np.mean(vals))
    return out


# -- the search -------------------------------------------------------------------------------------


@dataclass
class ThresholdOutcome:
    """Result of :func:`search_thresholds`.

    Attributes:
        best: the best trial's decode settings (thresholds of the searched regions).
        best_values: the same trial's flat Optuna values (``thresholds.WT`` ...), as searched.
        best_metric, baseline_metric: its score, and the default decode's (the first trial).
        best_metrics: every metric of the best trial.
        trials, seconds: configurations tried and the time they took.
        table: one row per trial: its flat values and metrics (``results.csv``).
        study: the Optuna study (for the plots).
    """

    best: DecodeSettings
    best_values: dict[str, Any]
    best_metric: float
    baseline_metric: float
    best_metrics: dict[str, float]
    trials: int
    seconds: float
    table: list[dict[str, Any]]
    study: Any = None

    @property
    def per_minute(self) -> float:
        return 60.0 * self.trials / self.seconds if self.seconds > 0 else float("inf")


def _check_regions(spec: ThresholdSpec, scheme: Any) -> None:
    for param in spec.params:
        if "." in param.name:
            kind, region = param.name.split(".", 1)
            valid = scheme.train_regions if kind == "thresholds" else tuple(scheme.regions)
            if region not in valid:
                raise ConfigError(
                    f"{spec.source or spec.name}: params.{param.name}: scheme '{scheme.name}' has no "
                    f"region '{region}'{suggest(region, valid)}; expected one of {list(valid)}"
                )


def _lesion_metric(spec: ThresholdSpec, scheme: Any, challenge: str | None) -> bool:
    """Whether ``spec.metric`` is lesion-wise (then it needs the challenge); checks its region."""
    metric = spec.metric
    match = METRIC.match(metric)
    if match and match.group(2) != "mean" and match.group(2) not in scheme.regions:
        raise ConfigError(f"metric {metric!r}: scheme '{scheme.name}' has no region '{match.group(2)}'")
    lesion = not metric.startswith("dice_") or metric.startswith("dice_lesion")
    if lesion and not challenge:
        raise ConfigError(f"metric {metric!r} needs the challenge (lesion-wise rules); pass challenge=")
    return lesion


def _default(param: ParamSpec) -> Any:
    """The untuned setting of a parameter: threshold 0.5, no minimum size, no hole filling."""
    if param.name.startswith("thresholds."):
        return DEFAULT_THRESHOLD if param.low is not None and param.low <= DEFAULT_THRESHOLD <= param.high else None
    if param.name.startswith("min_size."):
        return 0 if param.low is not None and param.low <= 0 else None
    if param.name == "fill_holes" and param.distribution == "categorical":
        return False if False in param.choices else None
    return None


def _study(spec: ThresholdSpec) -> optuna.Study:
    """A study whose first trial is the default decode (so tuning never scores below it)."""
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize", sampler=make_sampler(spec))
    searched = ("uniform", "int", "categorical", "loguniform", "logint")
    baseline = {p.name: _default(p) for p in spec.params if p.distribution in searched}
    study.enqueue_trial({k: v for k, v in baseline.items() if v is not None}, skip_if_exists=True)
    return study


def search_thresholds(
    spec: ThresholdSpec,
    cases: Sequence[CachedCase],
    scheme: Any,
    *,
    challenge: str | None,
    num_samples: int | None = None,
    timeout_s: float | None = None,
) -> ThresholdOutcome:
    """Optuna search over thresholds and post-processing on cached probabilities.

    The first trial is the default (thresholds 0.5, no post-processing), so ``best_metric`` is
    never worse than ``baseline_metric``.
    """
    if not cases:
        raise DataError(None, "threshold search needs at least one labelled validation case")
    _check_regions(spec, scheme)
    lesion = _lesion_metric(spec, scheme, challenge)
    study = _study(spec)
    table: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        values = spec.define_by_run(trial)
        settings = DecodeSettings.from_values(values, scheme.train_regions)
        metrics = evaluate(cases, scheme, settings, challenge=challenge, lesion=lesion)
        value = metrics.get(spec.metric, float("nan"))
        table.append({"trial": trial.number, **values, **metrics})
        return value if math.isfinite(value) else (-1e9 if spec.mode == "max" else 1e9)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    study.optimize(objective, n_trials=num_samples or spec.num_samples, timeout=timeout_s)
    seconds = time.perf_counter() - start
    best = study.best_trial
    row = table[best.number]
    values = {p.name: row[p.name] for p in spec.params if p.name in row}
    searched = [k.split(".", 1)[1] for k in values if k.startswith("thresholds.")]
    base_value = table[0].get(spec.metric, float("nan"))
    logger.info(
        "threshold search: %d configurations in %.1f s; %s %.4f (default %.4f)",
        len(table),
        seconds,
        spec.metric,
        best.value,
        base_value,
    )
    return ThresholdOutcome(
        best=DecodeSettings.from_values(values, searched),
        best_values=values,
        best_metric=float(best.value),
        baseline_metric=float(base_value),
        best_metrics={k: v for k, v in row.items() if k in table[0] and k.startswith(("dice", "hd95"))},
        trials=len(table),
        seconds=seconds,
        table=table,
        study=study,
    )
