"""The CV parent MLflow run: what it records at the start, and the metrics of every stage.

At the start: params ``cv.*`` (folds, fold seed, selection, gate size, data, lineage, resources,
output), the training config (flat params + ``config.yaml`` and ``cv_config.yaml``),
``folds.json`` (held-out ids per fold), ``splits_final.json`` (nnU-Net shape) and ``gate.json``.

After decode tuning, metrics (``<m>`` = ``dice_lesion_<R>``, ``hd95_lesion_<R>``, ``dice_<R>``
and each one's ``_mean``):

* ``cv/oos/<m>``: the honest estimate, cross-fitted (fold k decoded with settings tuned on the
  other folds' out-of-fold probabilities), pooled over every CV case;
* ``cv/<m>``: the same value as ``cv/oos/<m>`` (the name earlier versions logged; it used to hold
  the in-sample figure);
* ``cv/in_sample/<m>``: the deployed settings scored on the cases they were tuned on (optimistic);
* ``oof_default/<m>``: every case at the default decode (0.5, no post-processing);
* ``fold<i>/oof/<m>`` (default decode) and ``fold<i>/oos/<m>`` (cross-fitted) per fold, and
  ``oof/<m>`` / ``oos/<m>`` on the fold's child run;
* ``cv/train_s``, ``cv/threshold_trials``, ``cv/gate_cases``.

Params ``tuned.<param>`` (the deployed settings); artifacts ``thresholds.yaml``,
``thresholds/results.csv``, ``oos_cases.csv`` (per-case cross-fitted metrics and fold) and
``cases.json`` (which case each fold trained, selected and tuned on; the gate split). Each fold's
child run gets its own ``cases.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bratstune.search.crossval.decode_tuning import DecodeTuning
from bratstune.search.crossval.fold_trials import FoldRuns
from bratstune.search.crossval.folds import FoldPlan
from bratstune.search.crossval.spec import CrossValSpec
from bratstune.search.results import write_csv
from bratstune.tracking.runs import log_config, run_tags
from bratstune.training.config import TrainConfig

__all__ = ["log_case_records", "log_decode_tuning", "log_fold_metrics", "prefixed", "start_cv_run"]


def prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``{prefix + name: value}`` of the finite metrics."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def _metric_list(metrics: Mapping[str, float]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]


def start_cv_run(
    client: MlflowClient,
    experiment_id: str,
    name: str,
    config: TrainConfig,
    spec: CrossValSpec,
    plan: FoldPlan,
    out_dir: Path,
) -> str:
    """Create the CV parent run with its params, config and folds; returns its id."""
    prepared = plan.prepared
    extra = {"bratstune.kind": "crossval", "cv.name": name, "cv.output": str(out_dir)}
    if spec.search_run_id:
        extra["search_run_id"] = spec.search_run_id
    tags = run_tags(data_fingerprint=prepared.fingerprint, extra=extra)
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {
        "folds": plan.k,
        "fold_seed": spec.seed,
        "data.root": str(Path(prepared.root).absolute()),
        "data.cases": len(prepared.cases),
        "data.fingerprint": prepared.fingerprint,
        "search_run_id": spec.search_run_id or "",
        "selection": plan.selection_mode,
        "inner_val_fraction": spec.inner_val_fraction if plan.selection_mode == "inner" else "",
        "splits": str(spec.splits or ""),
        "gate_cases": len(plan.gate_ids),
        "gate_data": str(plan.gate_root or ""),
        "cv_cases": len(plan.cv_ids),
        "resources": json.dumps(spec.resources.as_tune()),
        "output": str(out_dir),
    }
    for key, value in params.items():
        client.log_param(run_id, f"cv.{key}", str(value))
    log_config(config, run_id=run_id)
    folds = {f"fold{i}": ids for i, ids in enumerate(plan.fold_ids)}
    client.log_text(run_id, json.dumps(folds, indent=1), "folds.json")
    client.log_text(run_id, json.dumps([s.to_json() for s in plan.splits()], indent=1), "splits_final.json")
    client.log_text(run_id, json.dumps({"gate": plan.gate_ids}, indent=1), "gate.json")
    client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "cv_config.yaml")
    return run_id


def log_fold_metrics(client: MlflowClient, parent_run_id: str, runs: FoldRuns, tuning: DecodeTuning) -> None:
    """Each fold's default-decode (``oof/``) and cross-fitted (``oos/``) metrics, on the parent and its child run."""
    for fold, (metrics, oos) in enumerate(zip(tuning.fold_metrics, tuning.fold_oos)):
        parent = {**prefixed(f"fold{fold}/oof/", metrics), **prefixed(f"fold{fold}/oos/", oos)}
        client.log_batch(parent_run_id, metrics=_metric_list(parent))
        run_id = runs.run_ids[fold]
        if run_id:
            client.log_batch(run_id, metrics=_metric_list({**prefixed("oof/", metrics), **prefixed("oos/", oos)}))
            client.set_tag(run_id, "cv.fold", str(fold))


def log_case_records(
    client: MlflowClient,
    parent_run_id: str,
    runs: FoldRuns,
    record: Mapping[str, Any],
    folds: Sequence[Mapping[str, Any]],
) -> None:
    """``cases.json`` on the parent (the whole CV) and on each fold's child run (that fold's)."""
    client.log_text(parent_run_id, json.dumps(record, indent=1), "cases.json")
    for fold, run_id in enumerate(runs.run_ids):
        if run_id:
            client.log_text(run_id, json.dumps(folds[fold], indent=1), "cases.json")


def log_decode_tuning(
    client: MlflowClient, parent_run_id: str, runs: FoldRuns, tuning: DecodeTuning, thresholds_yaml: Path
) -> None:
    """Pooled metrics (default, out-of-sample, in-sample), the deployed params, ``thresholds.yaml`` and the tables."""
    pooled = {
        **prefixed("oof_default/", tuning.default),
        **prefixed("cv/oos/", tuning.oos),
        **prefixed("cv/", tuning.oos),
        **prefixed("cv/in_sample/", tuning.in_sample),
        "cv/train_s": runs.seconds,
        "cv/threshold_trials": tuning.outcome.trials,
    }
    client.log_batch(parent_run_id, metrics=_metric_list(pooled))
    for key, value in tuning.outcome.best_values.items():
        client.log_param(parent_run_id, f"tuned.{key}", str(value))
    client.log_artifact(parent_run_id, str(thresholds_yaml))
    client.log_text(parent_run_id, write_csv(tuning.outcome.table), "thresholds/results.csv")
    rows = [{"case_id": c, "fold": tuning.case_fold.get(c, -1), **m} for c, m in sorted(tuning.case_metrics.items())]
    client.log_text(parent_run_id, write_csv(rows), "oos_cases.csv")
