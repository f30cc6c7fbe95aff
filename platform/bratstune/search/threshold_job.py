"""The threshold-search job's body: a finished model's validation probabilities, once; the search; its MLflow run.

::

    spec = load_threshold_space("search_spaces/thresholds.yaml")
    model, config = load_trained_model("3f2a...", scheme)            # MLflow run id, models:/..., folder
    cases = cache_probabilities(model, val_cases, settings)          # sliding window, once
    outcome = search_thresholds(spec, cases, scheme, challenge="GLI")  # bratstune.search.thresholds
    run_id = log_outcome(outcome, spec, client=client, experiment_id=eid, model_source="3f2a...")

:func:`run_threshold_search` does all four for ``jobs/search_thresholds.py``. The MLflow run holds
the best decode settings (``best_postprocess.yaml``, nested shape), ``best.<param>`` params, the
metric of every trial (step = trial number), ``results.csv`` and Optuna's plots.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bratstune.data.cohort import TrainData, prepare_cohort, preprocess_config, split_train_val
from bratstune.errors import ConfigError, DataError
from bratstune.inference.sliding_window import InferenceConfig, predict_probabilities
from bratstune.search.results import save_plots, write_csv
from bratstune.search.threshold_space import ThresholdSpec
from bratstune.search.thresholds import CachedCase, ThresholdOutcome, search_thresholds, settings_mapping
from bratstune.tracking.artifacts import RUN_ID, resolve_artifact
from bratstune.tracking.runs import run_tags
from bratstune.training.config import TrainConfig
from bratstune.training.fit import fit, inference_settings
from bratstune.training.network import load_network

logger = logging.getLogger(__name__)

__all__ = ["cache_probabilities", "load_trained_model", "log_outcome", "quick_model", "run_threshold_search"]


# -- probabilities, once -----------------------------------------------------------------------------


def cache_probabilities(model: torch.nn.Module, cases: Sequence[Any], settings: InferenceConfig) -> list[CachedCase]:
    """Sliding-window probabilities of every labelled case (``bratstune.inference.sliding_window.predict_probabilities``)."""
    if settings.mode != "region":
        raise ConfigError("threshold search needs a region-mode model (sigmoid per region); this one is label-mode")
    model.eval()
    out = []
    with torch.no_grad():
        for case in cases:
            if case.label is None:
                continue
            probs = predict_probabilities(model, case.image, settings).numpy().astype(np.float16)
            out.append(CachedCase(case.case_id, probs, np.asarray(case.label, dtype=np.uint8), tuple(case.spacing)))
    logger.info("cached probabilities of %d cases", len(out))
    return out


def load_trained_model(source: str | Path, scheme: Any, *, in_channels: int = 4) -> tuple[torch.nn.Module, TrainConfig]:
    """A trained network and its TrainConfig from a folder, an MLflow run id or a model URI.

    ``source`` may be a local folder holding ``config.yaml`` + weights (``fit``'s ``best/``), a
    32-hex MLflow run id or ``runs:/ID[/path]`` (its ``best_model`` artifact, as search trials and
    :class:`bratstune.search.reporter.MlflowReporter` log it), or a ``models:/NAME/VERSION`` /
    ``models:/NAME@champion`` URI whose files include ``config.yaml``
    (:func:`bratstune.tracking.artifacts.resolve_artifact`). A download is removed once loaded.
    """
    resolved = resolve_artifact(source, default_artifact="best_model", what="model")
    try:
        found = sorted(resolved.path.rglob("config.yaml"), key=lambda p: len(p.parts))
        if not found:
            raise DataError(resolved.path, "no config.yaml in the model folder (expected fit's best/ folder)")
        return load_network(found[0].parent, scheme, in_channels=in_channels)
    finally:
        resolved.cleanup()


def quick_model(cases: Sequence[Any], scheme: Any, out_dir: Path) -> Path:
    """Train a tiny model for one epoch (``--smoke-test`` without ``--model``); returns its best/ folder."""
    config = {
        "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32, 64]}},
        "epochs": 1,
        "steps_per_epoch": 3,
        "data": {"patch_size": 32, "num_workers": 0},
        "validation": {"lesion_metrics": False},
        "device": "cpu",
        "amp": "off",
        "num_threads": 1,
    }
    result = fit(config, TrainData(train=list(cases), val=list(cases)[:1], scheme=scheme), out_dir=out_dir)
    if result.best_dir is None:
        raise DataError(out_dir, "the smoke model produced no best checkpoint")
    return result.best_dir


# -- the MLflow run ------------------------------------------------------------------------------------


def _log_metrics(client: MlflowClient, run_id: str, outcome: ThresholdOutcome, metric: str) -> None:
    """Every trial's ``metric`` (step = trial number), the best and default values, the speed."""
    now = int(time.time() * 1000)
    history = [
        Metric(metric, float(row.get(metric, float("nan"))), now, int(row["trial"]))
        for row in outcome.table
        if math.isfinite(float(row.get(metric, float("nan"))))
    ]
    for start in range(0, len(history), 1000):
        client.log_batch(run_id, metrics=history[start : start + 1000])
    client.log_metric(run_id, f"best/{metric}", outcome.best_metric)
    client.log_metric(run_id, f"default/{metric}", outcome.baseline_metric)
    client.log_metric(run_id, "configs_per_minute", outcome.per_minute)
    for key, value in outcome.best_metrics.items():
        if math.isfinite(value):
            client.log_metric(run_id, f"best/{key}", value)


def log_outcome(
    outcome: ThresholdOutcome,
    spec: ThresholdSpec,
    *,
    client: MlflowClient,
    experiment_id: str,
    model_source: str,
    parent_run_id: str | None = None,
    data_fingerprint: str | None = None,
) -> str:
    """One MLflow run with the best thresholds/post-processing, per-trial metrics, table and plots."""
    extra = {"bratstune.kind": "threshold_search", "model.source": str(model_source)}
    if parent_run_id:
        extra["mlflow.parentRunId"] = parent_run_id
    tags = run_tags(data_fingerprint=data_fingerprint, extra=extra)
    run_id = client.create_run(experiment_id, run_name=f"{spec.name}-thresholds", tags=tags).info.run_id
    status = "FAILED"
    try:
        params = {
            "space": spec.name,
            "metric": spec.metric,
            "num_samples": outcome.trials,
            "seed": spec.search.seed,
            "algorithm": spec.search.algorithm,
            "model": model_source,
        }
        for key, value in params.items():
            client.log_param(run_id, key, str(value))
        for key, value in outcome.best_values.items():
            client.log_param(run_id, f"best.{key}", str(value))
        _log_metrics(client, run_id, outcome, spec.metric)
        best = yaml.safe_dump(settings_mapping(outcome.best), sort_keys=False)
        client.log_text(run_id, best, "best_postprocess.yaml")
        client.log_text(run_id, write_csv(outcome.table), "results.csv")
        if outcome.study is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for path in save_plots(outcome.study, Path(tmp)):
                    client.log_artifact(run_id, str(path), "plots")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return run_id


# -- the job's body --------------------------------------------------------------------------------------


def run_threshold_search(
    spec: ThresholdSpec,
    *,
    model: str | Path | None,
    data: str | Path,
    experiment_id: str,
    tracking_uri: str,
    num_samples: int | None = None,
    device: str = "cpu",
    workers: int = 1,
) -> tuple[ThresholdOutcome, str]:
    """Load a finished model, cache its validation probabilities once, search, log to MLflow.

    Args:
        model: folder, MLflow run id / ``runs:/`` URI, or ``models:/`` URI; ``None`` trains a
            one-epoch smoke model first.
        data: cohort folder; the validation cases are the split of ``spec.data`` (the same
            stratified split a search with the same ``data`` settings trained on).

    Returns:
        ``(outcome, mlflow_run_id)``; the run is a child of ``model``'s run when ``model`` is a run id.
    """
    prepared = prepare_cohort(Path(data), preprocess_config(spec.data.preprocess), workers=workers)
    split = split_train_val(
        prepared.cases, prepared.scheme, val_fraction=spec.data.val_fraction, seed=spec.data.split_seed
    )
    with tempfile.TemporaryDirectory(prefix="bratstune-thresholds-") as tmp:
        source = model if model is not None else quick_model(split.train, prepared.scheme, Path(tmp) / "model")
        network, config = load_trained_model(source, prepared.scheme)
        start = time.perf_counter()
        settings = inference_settings(config, torch.device(device))
        cases = cache_probabilities(network.to(device), split.val, settings)
        logger.info("validation probabilities of %d cases in %.1f s", len(cases), time.perf_counter() - start)
    challenge = config.challenge or prepared.challenge
    outcome = search_thresholds(spec, cases, prepared.scheme, challenge=challenge, num_samples=num_samples)
    text = str(model or "smoke model")
    parent = text if RUN_ID.fullmatch(text) else None
    run_id = log_outcome(
        outcome,
        spec,
        client=MlflowClient(tracking_uri),
        experiment_id=experiment_id,
        model_source=text,
        parent_run_id=parent,
        data_fingerprint=prepared.fingerprint,
    )
    return outcome, run_id
