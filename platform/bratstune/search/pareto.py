"""The Pareto front of a multi-objective search, as a table and a plot on the parent run.

A trial is on the front when no other trial is at least as good on every objective and better
on one. The front is Optuna's (``Study.best_trials`` of a study with one direction per
objective), so the definition is the one the sampler optimised; the plot is Optuna's
``plot_pareto_front`` (first two objectives).

Each trial is placed by the **last** value it reported of each objective: a multi-objective
search runs every trial to the end (FIFO), and the last epoch is the model the trial leaves.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

logger = logging.getLogger(__name__)

__all__ = ["pareto_rows", "pareto_study", "save_pareto_plot"]


def pareto_study(
    rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]], *, column: str = "last {metric}"
) -> tuple[optuna.Study, dict[int, str]]:
    """An in-memory multi-objective study with one completed trial per row with finite values.

    Args:
        rows: the search's results table (one mapping per trial, ``trial_id`` and the columns).
        objectives: ``(metric, mode)`` pairs, ``mode`` ``max`` or ``min``.
        column: the row key of each objective's value (``{metric}`` is replaced).

    Returns:
        ``(study, trial number -> trial_id)``.
    """
    study = optuna.create_study(directions=["maximize" if mode == "max" else "minimize" for _, mode in objectives])
    ids: dict[int, str] = {}
    for row in rows:
        values = [row.get(column.format(metric=metric)) for metric, _ in objectives]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            continue
        trial = optuna.trial.create_trial(values=[float(v) for v in values])
        study.add_trial(trial)
        ids[study.trials[-1].number] = str(row["trial_id"])
    return study, ids


def pareto_rows(
    rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]], *, column: str = "last {metric}"
) -> list[dict[str, Any]]:
    """The rows on the Pareto front, each with its objective values, sorted by the first objective."""
    study, ids = pareto_study(rows, objectives, column=column)
    if not study.trials:
        return []
    front = {ids[t.number] for t in study.best_trials}
    metric, mode = objectives[0]
    key = column.format(metric=metric)
    chosen = [dict(r) for r in rows if str(r["trial_id"]) in front]
    return sorted(chosen, key=lambda r: float(r[key]), reverse=mode == "max")


def save_pareto_plot(
    rows: Sequence[Mapping[str, Any]],
    objectives: Sequence[tuple[str, str]],
    path: Path,
    *,
    column: str = "last {metric}",
) -> Path | None:
    """Optuna's Pareto-front plot of the first two objectives (``None`` with fewer than 2 trials)."""
    study, _ = pareto_study(rows, objectives, column=column)
    if len(study.trials) < 2:
        return None
    # Deferred: matplotlib is needed only to draw this figure.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from optuna.visualization.matplotlib import plot_pareto_front  # noqa: PLC0415  (imports matplotlib)

    names = [metric for metric, _ in objectives[:2]]
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_pareto_front(study, target_names=names, targets=lambda t: tuple(t.values[:2]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes.set_title("Pareto front: " + " vs ".join(names))
    axes.figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(axes.figure)
    return path
