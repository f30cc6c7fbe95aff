"""Cross-fitting: tune on the other folds, score the held-out fold; pool per-case scores.

A setting tuned on the cases it is then scored on is in-sample: its score is optimistic. The
honest estimate of a tuned procedure (decode tuning, ensemble selection) is cross-fitted: for
each fold :math:`k`, the procedure is fitted on the out-of-fold probabilities of the other folds
:math:`\\{j \\ne k\\}` and applied to fold :math:`k`'s cases; each case is then scored exactly once,
by settings that never saw it, and the per-case scores are pooled:

.. math::

    \\hat s = \\frac{1}{n} \\sum_k \\sum_{i \\in F_k} s\\big(x_i;\\ \\theta_{-k}\\big),
    \\qquad \\theta_{-k} = \\operatorname{tune}\\big(\\{x_j : j \\notin F_k\\}\\big).

The deployed settings are tuned once more on every fold (:math:`\\theta` on all cases); their
score on those same cases is the in-sample figure, logged under a name that says so.

Per-case scores come from :func:`bratstune.search.thresholds.evaluate` on one case; pooling
(:func:`pool_metrics`) takes the mean over cases of each ``<prefix>_<R>`` and then the mean over
regions for ``<prefix>_mean`` (what ``evaluate`` does over a list of cases).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from bratstune.inference.decode import DecodeSettings
from bratstune.search.thresholds import CachedCase, evaluate

__all__ = ["PREFIXES", "crossfit", "per_case", "pool_metrics"]

#: Metric families pooled per region and as a ``_mean`` over regions.
PREFIXES = ("dice_lesion", "dice", "hd95_lesion")

T = TypeVar("T")
S = TypeVar("S")


def crossfit(groups: Sequence[Sequence[T]], fit: Callable[[list[T], int], S]) -> list[S]:
    """``[fit(items of every group but k, k) for each group k]``: one fitted object per held-out group."""
    return [fit([item for j, group in enumerate(groups) if j != k for item in group], k) for k in range(len(groups))]


def per_case(
    cases: Sequence[CachedCase], scheme: Any, settings: DecodeSettings, *, challenge: str | None, lesion: bool = True
) -> dict[str, dict[str, float]]:
    """``{case_id: metrics}`` of each case decoded with ``settings`` (``evaluate`` on one case)."""
    return {c.case_id: evaluate([c], scheme, settings, challenge=challenge, lesion=lesion) for c in cases}


def pool_metrics(
    rows: Mapping[str, Mapping[str, float]] | Sequence[Mapping[str, float]], regions: Sequence[str]
) -> dict[str, float]:
    """Mean over cases of every ``<prefix>_<R>``, then ``<prefix>_mean`` over ``regions``."""
    rows = list(rows.values()) if isinstance(rows, Mapping) else list(rows)
    keys = {k for row in rows for k in row if not k.endswith("_mean")}
    out = {}
    for key in sorted(keys):
        values = [float(row[key]) for row in rows if key in row and math.isfinite(float(row[key]))]
        if values:
            out[key] = float(np.mean(values))
    for prefix in PREFIXES:
        values = [out[f"{prefix}_{r}"] for r in regions if f"{prefix}_{r}" in out]
        if values:
            out[f"{prefix}_mean"] = float(np.mean(values))
    return out
