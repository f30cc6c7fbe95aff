"""What a finished search leaves behind: results table, best config, plots, on the parent run.

:func:`finish_parent_run` turns Tune's ``ResultGrid`` into

* ``results.csv``: one row per trial (id, status, searched values, best/last metric, epochs run,
  MLflow child run, error);
* ``best_config.yaml``: the full training config of the best trial, and ``best.*`` params;
* ``plots/optimization_history.png``, ``plots/param_importances.png``,
  ``plots/parallel_coordinate.png``: Optuna's matplotlib visualisations of a study rebuilt from
  the table (so they work for every sampler, after a resume, and with conditional parameters);

logged as artifacts of the parent MLflow run and written next to the Tune experiment.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from bratstune.search.callback import find_trial_run
from bratstune.search.params import ParamSpec
from bratstune.search.parent_run import objective_text
from bratstune.search.pareto import pareto_rows, save_pareto_plot
from bratstune.search.space import SearchSpec
from bratstune.tracking.runs import experiment_link
from bratstune.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["SearchOutcome", "finish_parent_run", "results_table", "rebuild_study", "save_plots", "write_csv"]


@dataclass
class SearchOutcome:
    """What :func:`bratstune.search.tune.run_search` returns.

    Attributes:
        name: the experiment name (folder under ``storage_path``).
        path: the experiment folder (``storage_path/name``), what ``resume`` restores.
        parent_run_id: the MLflow parent run.
        tracking_uri, experiment_id: where it lives.
        best_values: the best trial's searched values (flat dotted names).
        best_config: its full training config.
        best_metric: its best value of ``spec.metric``.
        best_run_id: its MLflow child run.
        table: one row per trial (also ``results.csv``).
        errors: number of trials that ended in error.
    """

    name: str
    path: str
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    best_values: dict[str, Any] = field(default_factory=dict)
    best_config: TrainConfig | None = None
    best_metric: float | None = None
    best_run_id: str | None = None
    table: list[dict[str, Any]] = field(default_factory=list)
    errors: int = 0

    @property
    def ui_command(self) -> str:
        """Where to compare the trials: a link that opens the experiment's runs table in the MLflow UI."""
        return experiment_link(self.tracking_uri, self.experiment_id)


_TRIAL_ID = re.compile(r"_([0-9a-f]{8}|[0-9a-f]{5}_\d{5})_\d+_")


def _trial_id(result: Any) -> str:
    metrics = result.metrics or {}
    if metrics.get("trial_id"):
        return str(metrics["trial_id"])
    match = _TRIAL_ID.search(Path(str(result.path)).name)
    return match.group(1) if match else Path(str(result.path)).name


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def results_table(grid: Any, spec: SearchSpec) -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid``, best value first (errors last)."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        best = last = None
        epochs = int(metrics.get("training_iteration", 0) or 0)
        if frame is not None and spec.metric in frame:
            series = frame[spec.metric].dropna()
            if len(series):
                best = float(series.max() if spec.mode == "max" else series.min())
                last = float(series.iloc[-1])
            if "training_iteration" in frame:
                epochs = int(frame["training_iteration"].max())
        row: dict[str, Any] = {
            "trial_id": _trial_id(result),
            "status": "ERROR" if result.error is not None else "TERMINATED",
            f"best {spec.metric}": best,
            f"last {spec.metric}": last,
            "epochs": epochs,
        }
        for metric, _ in spec.objectives[1:]:  # the other objectives of a multi-objective search
            last_value = metrics.get(metric)
            row[f"last {metric}"] = float(last_value) if isinstance(last_value, (int, float)) else None
        row.update({f"config/{k}": _cell(v) for k, v in sorted((result.config or {}).items())})
        row["error"] = "" if result.error is None else str(result.error).strip().splitlines()[-1][:500]
        rows.append(row)
    sign = -1.0 if spec.mode == "max" else 1.0
    rows.sort(key=lambda r: (r[f"best {spec.metric}"] is None, sign * (r[f"best {spec.metric}"] or 0.0)))
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of ``rows`` (columns: the union of keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    return buffer.getvalue()


def _distribution(param: ParamSpec) -> optuna.distributions.BaseDistribution | None:
    d = optuna.distributions
    if param.distribution in ("uniform", "loguniform"):
        return d.FloatDistribution(param.low, param.high, log=param.distribution == "loguniform", step=param.step)
    if param.distribution in ("int", "logint"):
        return d.IntDistribution(
            int(param.low), int(param.high), log=param.distribution == "logint", step=int(param.step or 1)
        )
    if param.distribution == "categorical":
        return d.CategoricalDistribution(list(param.labels))
    return None  # constant / derived: not searched


def _optuna_value(param: ParamSpec, value: Any) -> Any:
    if param.distribution != "categorical":
        return value
    for label, choice in zip(param.labels, param.choices):
        if choice == value or label == value:
            return label
    return None


def rebuild_study(spec: SearchSpec, rows: Sequence[Mapping[str, Any]]) -> optuna.Study:
    """An in-memory Optuna study holding one trial per table row (for the visualisations)."""
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize")
    key = f"best {spec.metric}"
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        params, dists = {}, {}
        sampled: dict[str, Any] = {}
        for param in spec.params:
            column = f"config/{param.name}"
            if column not in row or row[column] is None or row[column] == "":
                continue
            value = row[column]
            if isinstance(value, str) and value[:1] in "[{":
                value = json.loads(value)
            if param.when is not None and not param.when.holds(sampled):
                continue  # not sampled in this trial (its 'otherwise' value is not a draw)
            sampled[param.name] = value
            dist = _distribution(param)
            label = _optuna_value(param, value)
            if dist is None or label is None:
                continue
            try:
                if not dist._contains(dist.to_internal_repr(label)):
                    continue
            except (ValueError, TypeError):
                continue
            params[param.name], dists[param.name] = label, dist
        value = row.get(key)
        ok = value is not None and math.isfinite(float(value))
        state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
        try:
            trial = optuna.trial.create_trial(
                params=params,
                distributions=dists,
                value=float(value) if ok else None,
                state=state,
                user_attrs={"trial_id": row["trial_id"]},
            )
        except ValueError as exc:
            logger.warning("trial %s left out of the plots: %s", row["trial_id"], exc)
            continue
        study.add_trial(trial)
    return study


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG files.

    A plot that cannot be drawn (e.g. importances with fewer than two finished trials) is
    skipped with a warning.
    """
    # Deferred: matplotlib (and Optuna's plots, which import it) is only needed once a search ends.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from optuna.visualization import matplotlib as ovm  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    plots = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
    }
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            path = folder / f"{name}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            out.append(path)
        except Exception as exc:  # a plot is a nicety; never fail the search for it
            logger.warning("plot %s skipped: %s", name, exc)
    return out


def _record_best(client: Any, spec: SearchSpec, best: Mapping[str, Any], outcome: SearchOutcome) -> None:
    """Fill ``outcome``'s best fields from the best table row; log them to the parent run."""
    run_id = outcome.parent_run_id
    prefix = "config/"
    values = {k[len(prefix) :]: v for k, v in best.items() if k.startswith(prefix)}
    values = {k: (json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v) for k, v in values.items()}
    outcome.best_values = values
    outcome.best_config = spec.train_config(values)
    outcome.best_metric = float(best[f"best {spec.metric}"])
    outcome.best_run_id = best["mlflow_run_id"] or None
    client.log_metric(run_id, f"best/{spec.metric}", outcome.best_metric)
    for name, value in values.items():
        client.log_param(run_id, f"best.{name}", str(value)[:6000])
    client.set_tag(run_id, "best_trial_id", best["trial_id"])
    if outcome.best_run_id:
        client.set_tag(run_id, "best_run_id", outcome.best_run_id)
    client.set_tag(run_id, "mlflow.note.content", _best_note(spec, best["trial_id"], outcome))
    client.log_text(run_id, yaml.safe_dump(outcome.best_config.to_dict(), sort_keys=False), "best_config.yaml")


def _log_objective_on_trials(client: Any, spec: SearchSpec, rows: Sequence[Mapping[str, Any]]) -> None:
    """``best/<metric>`` on every trial's run: the value the search ranked it by (its best epoch).

    The run's own ``<metric>`` is its last epoch's value, which for a trial that ASHA stopped or
    that peaked early is not what the results table and the best trial are chosen by.
    """
    for row in rows:
        for metric, _ in spec.objectives:
            value = row.get(f"best {metric}")
            if row["mlflow_run_id"] and value is not None and math.isfinite(float(value)):
                client.log_metric(row["mlflow_run_id"], f"best/{metric}", float(value))


def _best_note(spec: SearchSpec, trial_id: str, outcome: SearchOutcome) -> str:
    """The parent run's description (Markdown): the objective and the best trial."""
    lines = [
        f"**Objective**: {objective_text(spec)} over {spec.num_samples} trials.",
        "",
        f"**Best trial** `{trial_id}` (run `{outcome.best_run_id or '-'}`): {spec.metric} = {outcome.best_metric:.4f}",
        "",
        *(f"- `{name}`: {value}" for name, value in outcome.best_values.items()),
    ]
    return "\n".join(lines)


def _write_outputs(output_dir: Path, text: str, outcome: SearchOutcome, plots: Path) -> None:
    """``results.csv``, ``best_config.yaml`` and ``plots/`` next to the Tune experiment."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.csv").write_text(text)
    if outcome.best_config is not None:
        (output_dir / "best_config.yaml").write_text(yaml.safe_dump(outcome.best_config.to_dict(), sort_keys=False))
    if plots.is_dir():
        for path in plots.iterdir():
            (output_dir / "plots").mkdir(exist_ok=True)
            (output_dir / "plots" / path.name).write_bytes(path.read_bytes())


def finish_parent_run(
    client: Any, spec: SearchSpec, grid: Any, outcome: SearchOutcome, *, output_dir: Path | None = None
) -> SearchOutcome:
    """Fill ``outcome`` from ``grid`` and log table, best config and plots to the parent run."""
    run_id = outcome.parent_run_id
    rows = results_table(grid, spec)
    for row in rows:
        row["mlflow_run_id"] = find_trial_run(client, outcome.experiment_id, run_id, row["trial_id"]) or ""
    _log_objective_on_trials(client, spec, rows)
    outcome.table = rows
    outcome.errors = sum(1 for r in rows if r["status"] == "ERROR")
    client.log_metric(run_id, "search/trials", len(rows))
    client.log_metric(run_id, "search/errored_trials", outcome.errors)
    client.log_metric(run_id, "search/trial_epochs", sum(int(r["epochs"] or 0) for r in rows))
    scored = [r for r in rows if r[f"best {spec.metric}"] is not None]
    if scored:
        _record_best(client, spec, scored[0], outcome)
    else:
        logger.warning("no trial reported %s: no best config", spec.metric)
    text = write_csv(rows)
    client.log_text(run_id, text, "results.csv")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "plots"
        if scored:
            for path in save_plots(rebuild_study(spec, rows), folder):
                client.log_artifact(run_id, str(path), "plots")
        if spec.multi_objective:
            _log_pareto(client, run_id, spec, rows, folder)
        if output_dir is not None:
            _write_outputs(output_dir, text, outcome, folder)
    return outcome


def _log_pareto(client: Any, run_id: str, spec: SearchSpec, rows: Sequence[Mapping[str, Any]], folder: Path) -> None:
    """``pareto_front.csv`` and ``plots/pareto_front.png`` of a multi-objective search."""
    front = pareto_rows(rows, spec.objectives)
    client.log_text(run_id, write_csv(front), "pareto_front.csv")
    client.log_metric(run_id, "search/pareto_trials", len(front))
    plot = save_pareto_plot(rows, spec.objectives, folder / "pareto_front.png")
    if plot is not None:
        client.log_artifact(run_id, str(plot), "plots")
    logger.info("Pareto front: %d of %d trials (%s)", len(front), len(rows), ", ".join(m for m, _ in spec.objectives))
