"""Ensemble selection over out-of-sample probabilities: metric-aware greedy, and the two usual baselines.

::

    candidates = [Candidate("cfg-a", oof_a), Candidate("cfg-b", oof_b), Candidate("cfg-c", oof_c)]
    chosen = greedy_selection(candidates, references, scheme, challenge="GLI")    # Caruana et al. 2004
    chosen.weights          # {"cfg-a": 3, "cfg-c": 1}: blend = (3 p_a + p_c) / 4
    equal_weights(candidates)                                   # "all folds, equal weights"
    best_n_by_voxel_dice(candidates, references, scheme, n=2)   # Auto3DSeg's choice

**What a member is.** A :class:`Candidate` is anything that gives an *out-of-sample* probability
map for every case selection scores: ``probs[case_id]`` is float ``(R, x, y, z)`` per region
channel. For a cross-validation a candidate is a **configuration**: its k fold models together,
where case i is predicted by the fold model that held i out (the out-of-fold probabilities of
:mod:`bratstune.search.crossval`). Individual fold models cannot be candidates against one
another: each has out-of-fold probabilities only for its own fold, so no two of them can be
compared on the same held-out cases. Several configurations cross-validated on the same folds
(e.g. the search's top trials, one CV each) are compared case by case, and the selected blend
deploys every fold model of each chosen configuration, weighted by its count. A finished search
trial can join as a candidate over the search's validation cases (its probabilities there are
out-of-sample for it); all candidates of one selection must cover the same cases.

**Greedy forward selection with replacement** (R. Caruana, A. Niculescu-Mizil, G. Crew,
A. Ksikes, "Ensemble selection from libraries of models", ICML 2004): start from the single best
candidate; at each step add (with replacement) the candidate whose addition gives the best
ensemble score; after ``max_steps`` additions keep the best-scoring prefix. The blend is the
count-weighted mean of probabilities,

.. math::

    \\bar p_i = \\frac{\\sum_m w_m\\, p_{m,i}}{\\sum_m w_m},

decoded with ``decode`` (:class:`~bratstune.inference.decode.DecodeSettings`) and scored with
the lesion-wise metric (:func:`bratstune.search.thresholds.evaluate`, default
``dice_lesion_mean``). A broken candidate lowers every blend it joins, so it is never in the kept
prefix unless it is all there is. Ties go to the name that sorts first (deterministic).

Selection scored on the cases it is then reported on is in-sample; the honest figure is
cross-fitted (:mod:`bratstune.search.crossval.ensemble_selection`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bratstune.errors import ConfigError
from bratstune.inference.decode import DecodeSettings
from bratstune.search.thresholds import CachedCase, evaluate

logger = logging.getLogger(__name__)

__all__ = [
    "SELECTORS",
    "Candidate",
    "Selection",
    "best_n_by_voxel_dice",
    "blend",
    "blended_cases",
    "equal_weights",
    "greedy_selection",
    "score_blend",
    "select",
]

#: Selector names accepted by :func:`select`.
SELECTORS = ("greedy", "equal", "best_n")


@dataclass
class Candidate:
    """One selectable member: a name and its out-of-sample probabilities per case.

    Attributes:
        name: unique among the candidates (e.g. a CV run name or a search trial id).
        probs: ``{case_id: float (R, x, y, z)}``, region channels in ``scheme.train_regions`` order.
        source: what deploys it (e.g. the fold-model folders of a configuration), kept as is.
    """

    name: str
    probs: Mapping[str, np.ndarray]
    source: Any = None


@dataclass
class Selection:
    """A selected blend.

    Attributes:
        weights: candidate name -> count (> 0); the blend weight is ``count / sum(counts)``.
        score: the blend's score on the selection cases (in-sample for the selection).
        metric, mode: what was optimised.
        method: ``greedy``, ``equal`` or ``best_n``.
        history: greedy only: ``(candidate added, ensemble score after the addition)`` per step.
    """

    weights: dict[str, int]
    score: float
    metric: str
    mode: str
    method: str
    history: list[tuple[str, float]] = field(default_factory=list)

    @property
    def members(self) -> list[str]:
        return sorted(n for n, w in self.weights.items() if w > 0)


def _by_name(candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    if not candidates:
        raise ConfigError("ensemble selection needs at least one candidate")
    out = {c.name: c for c in candidates}
    if len(out) != len(candidates):
        raise ConfigError(f"candidate names must be unique, got {[c.name for c in candidates]}")
    return out


def _check_cover(candidates: Mapping[str, Candidate], cases: Sequence[Any]) -> None:
    for cand in candidates.values():
        missing = [c.case_id for c in cases if c.case_id not in cand.probs]
        if missing:
            raise ConfigError(
                f"candidate {cand.name!r} has no out-of-sample probabilities for {len(missing)} case(s) "
                f"(e.g. {missing[0]}); every candidate must cover the selection cases"
            )


def blend(candidates: Mapping[str, Candidate], weights: Mapping[str, float], case_id: str) -> np.ndarray:
    """Weighted mean probabilities ``(R, x, y, z)`` (float32) of one case."""
    total = float(sum(w for w in weights.values() if w > 0))
    if total <= 0:
        raise ConfigError(f"blend weights must have a positive sum, got {dict(weights)}")
    out = None
    for name, w in weights.items():
        if w <= 0:
            continue
        p = np.asarray(candidates[name].probs[case_id], dtype=np.float32) * (float(w) / total)
        out = p if out is None else out + p
    return out


def blended_cases(
    candidates: Sequence[Candidate] | Mapping[str, Candidate], weights: Mapping[str, float], cases: Sequence[Any]
) -> list[CachedCase]:
    """The blend as :class:`~bratstune.search.thresholds.CachedCase` objects (for decode tuning)."""
    by = candidates if isinstance(candidates, Mapping) else _by_name(candidates)
    return [CachedCase(c.case_id, blend(by, weights, c.case_id), np.asarray(c.label), tuple(c.spacing)) for c in cases]


def score_blend(
    candidates: Sequence[Candidate] | Mapping[str, Candidate],
    weights: Mapping[str, float],
    cases: Sequence[Any],
    scheme: Any,
    *,
    challenge: str | None,
    decode: DecodeSettings | None = None,
    metric: str = "dice_lesion_mean",
) -> float:
    """Score of the blend with ``weights`` on ``cases`` (objects with ``case_id``, ``label``, ``spacing``)."""
    lesion = "lesion" in metric
    metrics = evaluate(
        blended_cases(candidates, weights, cases),
        scheme,
        decode or DecodeSettings(),
        challenge=challenge,
        lesion=lesion,
    )
    if metric not in metrics:
        raise ConfigError(
            f"metric {metric!r} is not scored here (have {sorted(metrics)}); lesion-wise needs a challenge"
        )
    return float(metrics[metric])


def _better(a: float, b: float, mode: str) -> bool:
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if mode == "max" else a < b


def greedy_selection(
    candidates: Sequence[Candidate],
    cases: Sequence[Any],
    scheme: Any,
    *,
    challenge: str | None,
    decode: DecodeSettings | None = None,
    metric: str = "dice_lesion_mean",
    mode: str = "max",
    max_steps: int = 10,
) -> Selection:
    """Caruana's greedy forward selection with replacement (see the module docstring).

    Args:
        candidates: the library (each covering every case of ``cases``).
        cases: the selection cases: objects with ``case_id``, ``label`` ``(x, y, z)`` and ``spacing``.
        scheme: the label scheme of the probabilities.
        challenge: lesion-wise rules (``None``: only voxel metrics can be scored).
        decode: decode settings of every blend (default 0.5, no post-processing).
        metric, mode: the score to optimise (``dice_lesion_mean``, max).
        max_steps: additions after the first member.
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: expected 'max' or 'min', got {mode!r}")
    by = _by_name(candidates)
    _check_cover(by, cases)
    names = sorted(by)

    def score(weights: Mapping[str, int]) -> float:
        return score_blend(by, weights, cases, scheme, challenge=challenge, decode=decode, metric=metric)

    weights: dict[str, int] = {}
    history: list[tuple[str, float]] = []
    best_weights, best_score = {}, float("nan")
    for _ in range(1 + max(0, int(max_steps))):
        step_name, step_score = None, float("nan")
        for name in names:
            trial = {**weights, name: weights.get(name, 0) + 1}
            value = score(trial)
            if step_name is None or _better(value, step_score, mode):
                step_name, step_score = name, value
        weights = {**weights, step_name: weights.get(step_name, 0) + 1}
        history.append((step_name, step_score))
        if not best_weights or _better(step_score, best_score, mode):
            best_weights, best_score = dict(weights), step_score
    logger.info("greedy selection: %s -> %s %.4f (%d steps)", best_weights, metric, best_score, len(history))
    return Selection(best_weights, best_score, metric, mode, "greedy", history)


def equal_weights(
    candidates: Sequence[Candidate],
    cases: Sequence[Any] = (),
    scheme: Any = None,
    *,
    challenge: str | None = None,
    decode: DecodeSettings | None = None,
    metric: str = "dice_lesion_mean",
    mode: str = "max",
) -> Selection:
    """Every candidate once ("all folds, equal weights"); scored when ``cases`` are given."""
    by = _by_name(candidates)
    weights = dict.fromkeys(sorted(by), 1)
    value = float("nan")
    if cases:
        _check_cover(by, cases)
        value = score_blend(by, weights, cases, scheme, challenge=challenge, decode=decode, metric=metric)
    return Selection(weights, value, metric, mode, "equal")


def best_n_by_voxel_dice(
    candidates: Sequence[Candidate],
    cases: Sequence[Any],
    scheme: Any,
    *,
    n: int = 5,
    challenge: str | None = None,
    decode: DecodeSettings | None = None,
    metric: str = "dice_lesion_mean",
    mode: str = "max",
) -> Selection:
    """The ``n`` candidates with the best voxel (legacy) Dice mean, equal weights (Auto3DSeg's choice).

    Ranking uses ``dice_mean`` at ``decode``, whatever ``metric`` is; the returned score is the
    blend's ``metric`` (for comparison with the other selectors).
    """
    if n < 1:
        raise ConfigError(f"n: expected >= 1 candidates to keep, got {n!r}")
    by = _by_name(candidates)
    _check_cover(by, cases)
    voxel = {
        name: score_blend(by, {name: 1}, cases, scheme, challenge=None, decode=decode, metric="dice_mean")
        for name in sorted(by)
    }
    ranked = sorted(voxel, key=lambda name: (-voxel[name] if math.isfinite(voxel[name]) else math.inf, name))
    weights = dict.fromkeys(ranked[:n], 1)
    lesion_ok = challenge is not None or "lesion" not in metric
    value = (
        score_blend(by, weights, cases, scheme, challenge=challenge, decode=decode, metric=metric)
        if lesion_ok
        else float("nan")
    )
    return Selection(weights, value, metric, mode, "best_n")


def select(
    method: str,
    candidates: Sequence[Candidate],
    cases: Sequence[Any],
    scheme: Any,
    *,
    challenge: str | None,
    decode: DecodeSettings | None = None,
    metric: str = "dice_lesion_mean",
    mode: str = "max",
    max_steps: int = 10,
    n: int = 5,
) -> Selection:
    """One entry point for the three selectors (``greedy``, ``equal``, ``best_n``)."""
    options = {"challenge": challenge, "decode": decode, "metric": metric, "mode": mode}
    if method == "greedy":
        return greedy_selection(candidates, cases, scheme, max_steps=max_steps, **options)
    if method == "equal":
        return equal_weights(candidates, cases, scheme, **options)
    if method == "best_n":
        return best_n_by_voxel_dice(candidates, cases, scheme, n=n, **options)
    raise ConfigError(f"unknown selector {method!r}; expected one of {list(SELECTORS)}")
