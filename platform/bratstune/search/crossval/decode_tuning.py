"""Stage 4, decode tuning: thresholds and post-processing cross-fitted on the pooled OOF probabilities.

The out-of-fold probabilities of every case are scored at the default decode (per fold and
pooled) and searched with :func:`bratstune.search.thresholds.search_thresholds` (no
re-inference); the default decode is its first trial, so tuning never scores worse than the
default on the OOF cases. The result is one :class:`~bratstune.inference.decode.DecodeSettings`
(a threshold for every region channel) written to ``<out>/thresholds.yaml``::

    thresholds: {WT: 0.45, TC: 0.5, ET: 0.4}
    postprocess: {min_size: {WT: 100, TC: 0, ET: 20}, fill_holes: false}
    metric: dice_lesion_mean
    tuned: 0.81
    default: 0.78
    trials: 100
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from bratstune.inference.decode import DecodeSettings
from bratstune.search.crossval.folds import FoldPlan
from bratstune.search.crossval.oof import load_oof
from bratstune.search.crossval.spec import DEFAULT_THRESHOLD_SPACE
from bratstune.search.threshold_space import ThresholdSpec, load_threshold_space, parse_threshold_space
from bratstune.search.thresholds import ThresholdOutcome, evaluate, search_thresholds, settings_mapping

logger = logging.getLogger(__name__)

__all__ = ["DecodeTuning", "threshold_spec", "tune_decode", "write_thresholds"]


@dataclass
class DecodeTuning:
    """What decode tuning found.

    Attributes:
        settings: the tuned decode settings (a threshold for every region channel).
        fold_metrics: per fold, OOF metrics of its held-out cases at the default decode.
        default: pooled OOF metrics, default decode (0.5, no post-processing).
        tuned: pooled OOF metrics with ``settings`` (the best trial's: no second pass).
        outcome: the threshold search itself (table, trials, flat best values).
        metric: the metric tuned (the threshold space's).
    """

    settings: DecodeSettings
    fold_metrics: list[dict[str, float]]
    default: dict[str, float]
    tuned: dict[str, float]
    outcome: ThresholdOutcome
    metric: str


def threshold_spec(space: str | Path | ThresholdSpec | None, challenge: str | None, trials: int) -> ThresholdSpec:
    """The threshold space of the tuning (default :data:`DEFAULT_THRESHOLD_SPACE`), ``trials`` trials.

    Without a challenge there are no lesion-wise rules: a lesion-wise metric falls back to the
    legacy ``dice_mean``.
    """
    if isinstance(space, ThresholdSpec):
        spec = space
    elif space is not None:
        spec = load_threshold_space(space)
    else:
        spec = parse_threshold_space(DEFAULT_THRESHOLD_SPACE)
    if not challenge and (spec.metric.startswith("dice_lesion") or spec.metric.startswith("hd95_lesion")):
        logger.warning("no challenge known: tuning thresholds on legacy dice_mean instead of %s", spec.metric)
        spec = replace(spec, metric="dice_mean", mode="max")
    return replace(spec, num_samples=int(trials))


def tune_decode(
    plan: FoldPlan, out_dir: Path, *, space: str | Path | ThresholdSpec | None, trials: int
) -> DecodeTuning:
    """Score the OOF probabilities at the default decode and tune the decode settings on them pooled."""
    scheme, challenge = plan.scheme, plan.challenge
    by_fold = [load_oof(out_dir, plan.held_out_cases(fold)) for fold in range(plan.k)]
    pooled = [case for fold in by_fold for case in fold]
    lesion = bool(challenge)
    default = DecodeSettings()
    fold_metrics = [evaluate(cases, scheme, default, challenge=challenge, lesion=lesion) for cases in by_fold]
    oof_default = evaluate(pooled, scheme, default, challenge=challenge, lesion=lesion)
    spec = threshold_spec(space, challenge, trials)
    outcome = search_thresholds(spec, pooled, scheme, challenge=challenge, num_samples=trials)
    return DecodeTuning(
        settings=outcome.best.with_thresholds(scheme.train_regions),
        fold_metrics=fold_metrics,
        default=oof_default,
        tuned=dict(outcome.best_metrics),
        outcome=outcome,
        metric=spec.metric,
    )


def write_thresholds(out_dir: Path, tuning: DecodeTuning) -> Path:
    """``<out>/thresholds.yaml``: the tuned decode settings, the metric, tuned and default scores."""
    payload = {
        **settings_mapping(tuning.settings),
        "metric": tuning.metric,
        "tuned": float(tuning.outcome.best_metric),
        "default": float(tuning.outcome.baseline_metric),
        "trials": int(tuning.outcome.trials),
    }
    path = out_dir / "thresholds.yaml"
    path.write_text(yaml.safe_dump(payload, sort_keys=False))
    return path
