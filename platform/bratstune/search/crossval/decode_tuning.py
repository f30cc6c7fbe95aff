"""Stage 4, decode tuning: thresholds and post-processing, cross-fitted for the estimate, pooled for deployment.

Three numbers come out of the out-of-fold (OOF) probabilities, and only one of them is honest
about the tuned pipeline:

* **default**: every case decoded at 0.5 with no post-processing (nothing tuned; per fold and pooled);
* **out-of-sample (cross-fitted)**: fold k's held-out cases decoded with settings tuned
  (:func:`bratstune.search.thresholds.search_thresholds`) on the *other* folds' OOF
  probabilities, each case scored once, pooled (:mod:`~bratstune.search.crossval.crossfit`);
  this is the estimate the CV reports (``cv/oos/*``);
* **in-sample**: the deployed settings, tuned on *all* OOF probabilities, scored on those same
  cases (``cv/in_sample/*``): optimistic, recorded for comparison only.

The deployed :class:`~bratstune.inference.decode.DecodeSettings` (a threshold for every region
channel) are written to ``<out>/thresholds.yaml``::

    thresholds: {WT: 0.45, TC: 0.5, ET: 0.4}
    postprocess: {min_size: {WT: 100, TC: 0, ET: 20}, fill_holes: false}
    metric: dice_lesion_mean
    out_of_sample: 0.78      # cross-fitted estimate of the tuned decode
    in_sample: 0.81          # the deployed settings on the cases they were tuned on
    default: 0.74
    trials: 100
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from bratstune.inference.decode import DecodeSettings
from bratstune.search.crossval.crossfit import crossfit, per_case, pool_metrics
from bratstune.search.crossval.folds import FoldPlan
from bratstune.search.crossval.oof import load_oof
from bratstune.search.crossval.spec import DEFAULT_THRESHOLD_SPACE
from bratstune.search.threshold_space import ThresholdSpec, load_threshold_space, parse_threshold_space
from bratstune.search.thresholds import CachedCase, ThresholdOutcome, evaluate, search_thresholds, settings_mapping

logger = logging.getLogger(__name__)

__all__ = ["DecodeTuning", "crossfit_decode", "threshold_spec", "tune_decode", "write_thresholds"]


@dataclass
class DecodeTuning:
    """What decode tuning found.

    Attributes:
        settings: the deployed decode settings (tuned on every OOF case).
        fold_metrics: per fold, OOF metrics of its held-out cases at the default decode.
        default: pooled OOF metrics, default decode (0.5, no post-processing).
        in_sample: pooled OOF metrics with ``settings`` (the cases they were tuned on: optimistic).
        oos: pooled cross-fitted metrics (each fold decoded with settings tuned on the others).
        fold_oos: per fold, its cross-fitted metrics.
        fold_settings: per fold, the settings tuned on the other folds.
        fold_tuned_on: per fold, the case ids those settings were tuned on.
        case_metrics: per case, its cross-fitted metrics (``oos_cases.csv``).
        case_fold: per case, the fold that holds it out.
        outcome: the deployed threshold search (table, trials, flat best values).
        metric: the metric tuned (the threshold space's).
    """

    settings: DecodeSettings
    fold_metrics: list[dict[str, float]]
    default: dict[str, float]
    in_sample: dict[str, float]
    oos: dict[str, float]
    fold_oos: list[dict[str, float]]
    fold_settings: list[DecodeSettings]
    fold_tuned_on: list[list[str]]
    case_metrics: dict[str, dict[str, float]]
    case_fold: dict[str, int]
    outcome: ThresholdOutcome
    metric: str

    @property
    def tuned(self) -> dict[str, float]:
        """The in-sample figure (kept for callers of the old name; see :attr:`oos` for the estimate)."""
        return self.in_sample


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


def _tune(spec: ThresholdSpec, cases: list[CachedCase], scheme, challenge: str | None) -> ThresholdOutcome:
    return search_thresholds(spec, cases, scheme, challenge=challenge, num_samples=spec.num_samples)


def crossfit_decode(
    by_fold: list[list[CachedCase]], scheme, spec: ThresholdSpec, *, challenge: str | None
) -> tuple[list[DecodeSettings], dict[str, dict[str, float]], list[dict[str, float]]]:
    """Cross-fitted decode tuning: ``(fold settings, per-case metrics, per-fold pooled metrics)``.

    Fold k's settings are tuned on the other folds' cases only and decode fold k's cases.
    """
    regions = tuple(scheme.regions)
    lesion = bool(challenge)

    def fit(cases: list[CachedCase], k: int) -> DecodeSettings:
        return _tune(spec, cases, scheme, challenge).best.with_thresholds(scheme.train_regions)

    fold_settings = crossfit(by_fold, fit)
    cases: dict[str, dict[str, float]] = {}
    fold_oos = []
    for settings, fold in zip(fold_settings, by_fold):
        rows = per_case(fold, scheme, settings, challenge=challenge, lesion=lesion)
        cases.update(rows)
        fold_oos.append(pool_metrics(rows, regions))
    return fold_settings, cases, fold_oos


def tune_decode(
    plan: FoldPlan, out_dir: Path, *, space: str | Path | ThresholdSpec | None, trials: int
) -> DecodeTuning:
    """Default, cross-fitted (out-of-sample) and deployed (in-sample) decode on the OOF probabilities."""
    scheme, challenge = plan.scheme, plan.challenge
    by_fold = [load_oof(out_dir, plan.held_out_cases(fold)) for fold in range(plan.k)]
    pooled = [case for fold in by_fold for case in fold]
    lesion = bool(challenge)
    default = DecodeSettings()
    fold_metrics = [evaluate(cases, scheme, default, challenge=challenge, lesion=lesion) for cases in by_fold]
    oof_default = evaluate(pooled, scheme, default, challenge=challenge, lesion=lesion)
    spec = threshold_spec(space, challenge, trials)
    fold_settings, case_metrics, fold_oos = crossfit_decode(by_fold, scheme, spec, challenge=challenge)
    outcome = _tune(spec, pooled, scheme, challenge)
    ids = [[c.case_id for c in fold] for fold in by_fold]
    tuning = DecodeTuning(
        settings=outcome.best.with_thresholds(scheme.train_regions),
        fold_metrics=fold_metrics,
        default=oof_default,
        in_sample=dict(outcome.best_metrics),
        oos=pool_metrics(case_metrics, tuple(scheme.regions)),
        fold_oos=fold_oos,
        fold_settings=fold_settings,
        fold_tuned_on=[[c for j, fold in enumerate(ids) if j != k for c in fold] for k in range(len(ids))],
        case_metrics=case_metrics,
        case_fold={c: k for k, fold in enumerate(ids) for c in fold},
        outcome=outcome,
        metric=spec.metric,
    )
    logger.info(
        "decode tuning: %s %.4f out-of-sample (cross-fitted), %.4f in-sample, %.4f default",
        spec.metric,
        tuning.oos.get(spec.metric, float("nan")),
        tuning.in_sample.get(spec.metric, float("nan")),
        tuning.default.get(spec.metric, float("nan")),
    )
    return tuning


def write_thresholds(out_dir: Path, tuning: DecodeTuning) -> Path:
    """``<out>/thresholds.yaml``: the deployed decode settings, the metric and its three figures."""
    payload = {
        **settings_mapping(tuning.settings),
        "metric": tuning.metric,
        "out_of_sample": float(tuning.oos.get(tuning.metric, float("nan"))),
        "in_sample": float(tuning.outcome.best_metric),
        "default": float(tuning.default.get(tuning.metric, float("nan"))),
        "trials": int(tuning.outcome.trials),
        "crossfit": [settings_mapping(s) for s in tuning.fold_settings],
    }
    path = out_dir / "thresholds.yaml"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(payload, sort_keys=False))
    tmp.replace(path)
    return path
