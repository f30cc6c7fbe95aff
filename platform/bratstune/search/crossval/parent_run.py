"""The CV parent MLflow run: what it records at the start, and the metrics of every stage.

Params ``cv.*`` (folds, fold seed, data, lineage, resources, output), the training config
(flat params + ``config.yaml`` and ``cv_config.yaml``) and ``folds.json``; then per fold
``fold<i>/oof/<metric>`` (and ``oof/<metric>`` on the fold's child run), pooled
``oof_default/...``, ``oof_tuned/...`` and ``cv/...`` (= tuned), ``cv/train_s``,
``cv/threshold_trials``, ``tuned.<param>`` params, ``thresholds.yaml`` and
``thresholds/results.csv``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path

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

__all__ = ["log_decode_tuning", "log_fold_metrics", "prefixed", "start_cv_run"]


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
        "resources": json.dumps(spec.resources.as_tune()),
        "output": str(out_dir),
    }
    for key, value in params.items():
        client.log_param(run_id, f"cv.{key}", str(value))
    log_config(config, run_id=run_id)
    folds = {f"fold{i}": ids for i, ids in enumerate(plan.fold_ids)}
    client.log_text(run_id, json.dumps(folds, indent=1), "folds.json")
    client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "cv_config.yaml")
    return run_id


def log_fold_metrics(client: MlflowClient, parent_run_id: str, runs: FoldRuns, tuning: DecodeTuning) -> None:
    """Each fold's default-decode OOF metrics, on the parent and on the fold's child run."""
    for fold, metrics in enumerate(tuning.fold_metrics):
        client.log_batch(parent_run_id, metrics=_metric_list(prefixed(f"fold{fold}/oof/", metrics)))
        run_id = runs.run_ids[fold]
        if run_id:
            client.log_batch(run_id, metrics=_metric_list(prefixed("oof/", metrics)))
            client.set_tag(run_id, "cv.fold", str(fold))


def log_decode_tuning(
    client: MlflowClient, parent_run_id: str, runs: FoldRuns, tuning: DecodeTuning, thresholds_yaml: Path
) -> None:
    """Pooled OOF metrics (default, tuned, ``cv/``), the tuned params, ``thresholds.yaml`` and the table."""
    pooled = {
        **prefixed("oof_default/", tuning.default),
        **prefixed("oof_tuned/", tuning.tuned),
        **prefixed("cv/", tuning.tuned),
        "cv/train_s": runs.seconds,
        "cv/threshold_trials": tuning.outcome.trials,
    }
    client.log_batch(parent_run_id, metrics=_metric_list(pooled))
    for key, value in tuning.outcome.best_values.items():
        client.log_param(parent_run_id, f"tuned.{key}", str(value))
    client.log_artifact(parent_run_id, str(thresholds_yaml))
    client.log_text(parent_run_id, write_csv(tuning.outcome.table), "thresholds/results.csv")
