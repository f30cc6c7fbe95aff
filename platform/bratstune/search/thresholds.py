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

Scoring hundreds of configurations of the same cases reuses what does not change
(:mod:`bratstune.search.decode_cache`: the reference prepared once per case, only the box that a
configuration can label decoded; the same values as decoding and scoring the whole volume), and
``workers=2`` spreads the cases over two processes.

Metrics: ``dice_lesion_<R>``, ``dice_<R>`` (legacy), ``hd95_lesion_<R>`` and their ``_mean``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError, DataError
from bratstune.inference.decode import DEFAULT_THRESHOLD, DecodeSettings
from bratstune.search.decode_cache import CasePool, case_metrics
from bratstune.search.params import ParamSpec
from bratstune.search.sections import make_sampler
from bratstune.search.threshold_space import METRIC, ThresholdSpec

logger = logging.getLogger(__name__)

__all__ = ["CachedCase", "ThresholdOutcome", "evaluate", "search_thresholds", "settings_mapping"]


@dataclass
class CachedCase:
    """Validation probabilities of one case, kept in memory for the whole search.

    Attributes:
        probs: float16 ``(R, x, y, z)`` sigmoid per region channel (``scheme.train_regions``).
        label: uint8 reference ``(x, y, z)``.
        spacing: voxel size in mm.

    From its second scoring on, :func:`evaluate` keeps on the case what every configuration reuses
    (:class:`~bratstune.search.decode_cache.PreparedCase`; :func:`search_thresholds` from the
    first); it is rebuilt when ``probs`` or ``label`` is replaced by another array (not when one
    is changed in place), and left out when the case is pickled or copied.
    """

    case_id: str
    probs: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    _prepared: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the prepared state (it stays in its process, and is rebuilt)."""
        return {**vars(self), "_prepared": {}}


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

    ``DecodeSettings()`` scores the default decode (threshold 0.5, no post-processing). Each case is
    decoded with :meth:`DecodeSettings.decode_regions` and scored with ``region_dice`` and
    ``lesion_wise`` (value for value; :mod:`bratstune.search.decode_cache` reuses the reference
    across calls and decodes only the box that can change).
    """
    return _mean_metrics([case_metrics(case, scheme, settings, challenge, lesion) for case in cases], scheme)


def _mean_metrics(rows: Sequence[Mapping[str, float]], scheme: Any) -> dict[str, float]:
    """Per-case metrics -> their NaN-mean over cases, plus ``<prefix>_mean`` over the regions."""
    per: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            per.setdefault(key, []).append(value)
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
    workers: int = 1,
) -> ThresholdOutcome:
    """Optuna search over thresholds and post-processing on cached probabilities.

    The first trial is the default (thresholds 0.5, no post-processing), so ``best_metric`` is
    never worse than ``baseline_metric``. ``workers > 1`` scores the cases in that many processes
    forked once (:class:`~bratstune.search.decode_cache.CasePool`; same values, in case order).
    """
    if not cases:
        raise DataError(None, "threshold search needs at least one labelled validation case")
    _check_regions(spec, scheme)
    lesion = _lesion_metric(spec, scheme, challenge)
    study = _study(spec)
    table: list[dict[str, Any]] = []

    pool = CasePool(cases, scheme, challenge=challenge, lesion=lesion, workers=workers)

    def objective(trial: optuna.Trial) -> float:
        values = spec.define_by_run(trial)
        settings = DecodeSettings.from_values(values, scheme.train_regions)
        metrics = _mean_metrics(pool.metrics(settings), scheme)
        value = metrics.get(spec.metric, float("nan"))
        table.append({"trial": trial.number, **values, **metrics})
        return value if math.isfinite(value) else (-1e9 if spec.mode == "max" else 1e9)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    with pool:
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
