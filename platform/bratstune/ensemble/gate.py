"""The promotion gate's evidence: two models scored on the same held-out cases, a paired bootstrap.

Like with like: the candidate and the champion are scored by the same code
(:func:`score_ensemble`: each ensemble segments the raw NIfTI with its own recipe and decode
settings; :func:`bratstune.metrics.lesion_wise` scores the label map on the input grid) on the
same cases (:func:`gate_case_ids`: the candidate's recorded gate split minus every case that
either model trained on, chose its epoch on or tuned its decode settings on). The per-case
difference in the gate metric, signed so that a positive value favours the candidate,

.. math::

    d_i = s_i^{cand} - s_i^{champ} \\quad (\\text{mode max}), \\qquad
    d_i = s_i^{champ} - s_i^{cand} \\quad (\\text{mode min}),

is summarised by its mean :math:`\\bar d` and a percentile-bootstrap interval of that mean
(``scipy.stats.bootstrap`` over cases; pairs are resampled together, since :math:`d_i` is one
number per case). :func:`decide` promotes when the interval's lower end exceeds the margin
(``rule: lower_bound``, the default) or when :math:`\\bar d` does (``rule: mean``).

Per-case metric names: ``dice_lesion_<R>``, ``hd95_lesion_<R>`` (lesion-wise), ``dice_<R>``,
``hd95_<R>`` (legacy, whole volume) and each one's ``_mean`` over the regions of the protocol.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from bratstune.config_utils import check_choice
from bratstune.data.case import load_case
from bratstune.data.splits import CaseRecord
from bratstune.errors import ConfigError
from bratstune.metrics import lesion_wise

__all__ = [
    "GATE_RULES",
    "GateSpec",
    "PairedDifference",
    "Scorer",
    "case_metrics",
    "decide",
    "gate_case_ids",
    "paired_bootstrap",
    "score_ensemble",
]

#: ``lower_bound``: the bootstrap interval's lower end must exceed the margin; ``mean``: the mean must.
GATE_RULES = ("lower_bound", "mean")

#: ``lesion_wise`` result key -> per-case metric prefix.
_KEYS = {
    "lesionwise_dice": "dice_lesion",
    "lesionwise_hd95": "hd95_lesion",
    "legacy_dice": "dice",
    "legacy_hd95": "hd95",
}

_METRIC = re.compile(r"^(dice_lesion|hd95_lesion|dice|hd95)_[A-Za-z]+$")

#: ``scorer(ensemble, cases) -> {case_id: {metric: value}}`` (:func:`score_ensemble` by default).
Scorer = Callable[[Any, Sequence[Any]], dict[str, dict[str, float]]]


@dataclass(frozen=True)
class GateSpec:
    """How the promotion gate decides (YAML ``gate:`` of a CV spec; flags of ``bratstune promote``).

    Args:
        metric: per-case metric compared (``dice_lesion_mean`` by default; see the module docstring).
        mode: ``max`` (higher is better) or ``min`` (e.g. ``hd95_lesion_mean``).
        margin: how much the candidate must win by, in the metric's units.
        rule: ``lower_bound`` (the interval's lower end > margin) or ``mean`` (the mean > margin).
        confidence: the bootstrap interval's level.
        resamples: bootstrap resamples.
        seed: the bootstrap's random seed (the decision is reproducible).
        min_cases: fewer shared held-out cases than this: no decision (not promoted).
        protocol: lesion-wise protocol (``brats2023`` or ``brats2026``).
        tta: ``None``: each ensemble's own test-time views; ``False``: none for either (faster;
            still like with like); ``True``: flips for both.
    """

    metric: str = "dice_lesion_mean"
    mode: str = "max"
    margin: float = 0.0
    rule: str = "lower_bound"
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    min_cases: int = 3
    protocol: str = "brats2023"
    tta: bool | None = None

    def __post_init__(self) -> None:
        check_choice(self.mode, ("max", "min"), "gate.mode")
        check_choice(self.rule, GATE_RULES, "gate.rule")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"gate.confidence: expected 0.5 <= value < 1, got {self.confidence!r}")
        if self.resamples < 100:
            raise ConfigError(f"gate.resamples: expected >= 100, got {self.resamples!r}")
        if self.min_cases < 1:
            raise ConfigError(f"gate.min_cases: expected >= 1, got {self.min_cases!r}")
        if not _METRIC.match(str(self.metric)):
            raise ConfigError(
                f"gate.metric: expected <dice_lesion|hd95_lesion|dice|hd95>_<REGION or mean> "
                f"(e.g. dice_lesion_mean), got {self.metric!r}"
            )
        if not math.isfinite(float(self.margin)):
            raise ConfigError(f"gate.margin: expected a finite number, got {self.margin!r}")

    def with_metric(self, metric: str | None, mode: str | None = None) -> GateSpec:
        """This spec with another metric (a recorded name like ``cv/oos/dice_lesion_mean`` is cut to its last part)."""
        out = self
        if metric:
            out = replace(out, metric=str(metric).rsplit("/", 1)[-1])
        if mode:
            out = replace(out, mode=mode)
        return out


# -- which cases -------------------------------------------------------------------------------------------


def gate_case_ids(
    candidate: CaseRecord, champion: CaseRecord | None, override: Iterable[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The shared held-out cases: the gate split minus every case either model used.

    Args:
        candidate: the candidate's case record (its ``gate`` list is the default gate split).
        champion: the champion's record (``None``: no champion).
        override: gate case ids to use instead of ``candidate.gate``.

    Returns:
        ``(ids, excluded)``: the sorted case ids that count, and ``{case_id: why}`` for the dropped ones.
    """
    wanted = sorted(set(override) if override is not None else set(candidate.gate))
    excluded: dict[str, str] = {}
    for case_id in wanted:
        for who, record in (("candidate", candidate), ("champion", champion)):
            if record is None:
                continue
            for role in ("trained", "selected", "tuned"):
                if case_id in getattr(record, role):
                    excluded.setdefault(case_id, f"the {who} {role} on it")
    return [c for c in wanted if c not in excluded], excluded


# -- scores ---------------------------------------------------------------------------------------------------


def case_metrics(
    pred: np.ndarray, label: np.ndarray, challenge: str, spacing: Sequence[float], protocol: str
) -> dict[str, float]:
    """Per-case metrics of one label map (``dice_lesion_<R>`` ... and their ``_mean``)."""
    result = lesion_wise(pred, label, challenge, protocol, spacing)
    out: dict[str, float] = {}
    for region, row in result.items():
        for key, prefix in _KEYS.items():
            if key in row and row[key] is not None:
                out[f"{prefix}_{region}"] = float(row[key])
    for prefix in _KEYS.values():
        values = [v for k, v in out.items() if k.rsplit("_", 1)[0] == prefix and math.isfinite(v)]
        if values:
            out[f"{prefix}_mean"] = float(np.mean(values))
    return out


def score_ensemble(
    ensemble: Any, cases: Sequence[Any], *, protocol: str = "brats2023", tta: bool | None = None, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Segment each raw case (``bratstune.data.case.Case``) with ``ensemble`` and score it.

    Returns:
        ``{case_id: {metric: value}}`` (see :func:`case_metrics`).
    """
    if tta is not None:
        ensemble = replace(ensemble, inference=replace(ensemble.inference, flips=bool(tta), rotate90=False))
    challenge = (ensemble.challenge or "GLI").upper()
    out = {}
    for case in cases:
        data = load_case(case)
        if data.label is None:
            raise ConfigError(f"gate case {case.case_id} has no label; gate cases must be labelled")
        labels = ensemble.segment(data, device=device).labels
        out[case.case_id] = case_metrics(labels, data.label, challenge, data.spacing, protocol)
    return out


# -- the comparison -------------------------------------------------------------------------------------------


@dataclass
class PairedDifference:
    """Per-case scores of both models and the bootstrap interval of their mean difference.

    Attributes:
        cases: the case ids compared.
        candidate, champion: the gate metric per case (same order as ``cases``).
        mean: mean of :math:`d_i` (positive favours the candidate, whatever the mode).
        low, high: the percentile-bootstrap interval of the mean, at ``confidence``.
    """

    metric: str
    mode: str
    cases: list[str]
    candidate: list[float]
    champion: list[float]
    mean: float
    low: float
    high: float
    confidence: float
    resamples: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def differences(self) -> list[float]:
        sign = 1.0 if self.mode == "max" else -1.0
        return [sign * (a - b) for a, b in zip(self.candidate, self.champion)]

    def table(self) -> list[dict[str, Any]]:
        """One row per case: ``case_id``, both scores and the signed difference (``gate/cases.csv``)."""
        return [
            {"case_id": c, f"candidate_{self.metric}": a, f"champion_{self.metric}": b, "difference": d}
            for c, a, b, d in zip(self.cases, self.candidate, self.champion, self.differences)
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "cases": len(self.cases),
            "candidate_mean": float(np.mean(self.candidate)),
            "champion_mean": float(np.mean(self.champion)),
            "difference_mean": self.mean,
            "interval": [self.low, self.high],
            "confidence": self.confidence,
            "resamples": self.resamples,
            **self.extra,
        }


def paired_bootstrap(
    candidate: Mapping[str, float],
    champion: Mapping[str, float],
    *,
    metric: str = "dice_lesion_mean",
    mode: str = "max",
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """Paired per-case difference on the cases both score, with a percentile-bootstrap interval.

    Raises:
        ConfigError: no case scored by both, or a non-finite score.
    """
    cases = sorted(set(candidate) & set(champion))
    if not cases:
        raise ConfigError("paired comparison: no case is scored by both models")
    a = np.array([float(candidate[c]) for c in cases])
    b = np.array([float(champion[c]) for c in cases])
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ConfigError(f"paired comparison: non-finite {metric} on some case; cannot bootstrap")
    d = (a - b) if mode == "max" else (b - a)
    mean = float(d.mean())
    if d.size < 2 or np.all(d == d[0]):
        low = high = mean  # no spread to resample
    else:
        res = stats.bootstrap(
            (d,),
            np.mean,
            confidence_level=confidence,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedDifference(metric, mode, cases, a.tolist(), b.tolist(), mean, low, high, confidence, resamples)


def decide(evidence: PairedDifference, spec: GateSpec) -> tuple[bool, str]:
    """``(promote, reason)`` from the evidence and the rule (see the module docstring)."""
    n = len(evidence.cases)
    pct = f"{evidence.confidence:.0%}"
    text = (
        f"{evidence.metric} on {n} held-out gate case(s): candidate {np.mean(evidence.candidate):.4f} vs champion "
        f"{np.mean(evidence.champion):.4f}; paired difference {evidence.mean:+.4f} "
        f"({pct} interval {evidence.low:+.4f} .. {evidence.high:+.4f}), margin {spec.margin:+.4f}"
    )
    if n < spec.min_cases:
        return False, f"only {n} shared held-out gate case(s) (need {spec.min_cases}): {text}"
    value = evidence.low if spec.rule == "lower_bound" else evidence.mean
    what = "interval's lower end" if spec.rule == "lower_bound" else "mean difference"
    if value > spec.margin:
        return True, f"{text}: the {what} exceeds the margin"
    return False, f"{text}: the {what} does not exceed the margin"
