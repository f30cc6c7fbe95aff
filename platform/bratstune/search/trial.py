"""One Ray Tune trial = one :func:`bratstune.training.fit.fit` of a sampled config.

::

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": 1, "gpu": 0})

:func:`run_trial` is the function trainable: it turns the trial's flat values into a
:class:`~bratstune.training.config.TrainConfig`, opens (or, after a retry or restore, reopens)
the trial's MLflow child run, and trains with a reporter that logs the epoch to that run
*before* ``ray.tune.report(metrics, checkpoint=...)``, so that ASHA can stop a weak trial after
any epoch without losing what it logged (the objective first: MLflow's compare view plots the
first metric of a run). The run also records the cohort as its dataset input (the runs table's
Dataset column) and the Ray node of the trial's latest attempt (tag ``ray.node_id``); the device
follows the trial's own GPU share (:func:`trial_device`). :class:`TrialContext` is everything
else the trial needs, shipped once through the object store. Cross-validation folds run the
same function (:mod:`bratstune.search.crossval.folds`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from bratstune.device import select_trial_device
from bratstune.errors import ConfigError
from bratstune.search.callback import STOP_TAG, TRIAL_TAG, find_trial_run
from bratstune.search.data import DataHandle
from bratstune.search.params import apply_values
from bratstune.search.reporter import MlflowReporter
from bratstune.tracking.artifacts import localise_config
from bratstune.tracking.outage import UNSENT_FILE, flush_timeout, wait_for_server
from bratstune.tracking.runs import log_cohort_input, log_config, run_tags
from bratstune.training.config import TrainConfig, load_train_config
from bratstune.training.fit import fit
from bratstune.training.report import EpochReport

logger = logging.getLogger(__name__)

__all__ = ["NODE_TAG", "TrialContext", "outage_spool", "run_trial", "trainable", "trial_device"]

#: Child-run tag: the Ray node id of the trial's latest attempt.
NODE_TAG = "ray.node_id"


@dataclass
class TrialContext:
    """Everything a trial receives besides its sampled values (shipped once via the object store)."""

    search_name: str
    base: dict[str, Any]
    metric: str | tuple[str, ...]  # the objective(s) every report must carry
    data: DataHandle
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus: float = 1.0
    fit_fn: Callable[..., Any] | None = None
    #: where a trial keeps what a dead tracking server could not take (:func:`outage_spool`)
    spool_dir: str | None = None


def outage_spool(storage: str | Path, name: str) -> str | None:
    """``<storage>/<name>/mlflow-unsent``: where a Tune experiment's trials keep what MLflow missed.

    ``None`` for a URI storage (``s3://``): a trial then keeps it in its own folder on its node.
    The driver sends these files when the experiment ends (:func:`bratstune.search.callback.replay_outage`).
    """
    storage = str(storage)
    return None if "://" in storage else str(Path(storage) / name / "mlflow-unsent")


def trainable(ctx: TrialContext, resources: Mapping[str, float]) -> Any:
    """:func:`run_trial` bound to ``ctx``, with its per-trial ``resources`` (``{"cpu": 1, "gpu": 0}``)."""
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), dict(resources))


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


def _open_run(
    client: MlflowClient, ctx: TrialContext, config: Mapping[str, Any], train_config: TrainConfig, data: DataHandle
) -> str:
    """The trial's child run: found again by its ``ray_trial_id`` tag, else created with its params."""
    context = tune.get_context()
    trial_id = context.get_trial_id()
    node = ray.get_runtime_context().get_node_id()  # where this attempt runs (a retry may move)
    run_id = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")
        client.set_tag(run_id, NODE_TAG, node)
        return run_id
    extra = {"mlflow.parentRunId": ctx.parent_run_id, TRIAL_TAG: trial_id, "search": ctx.search_name, NODE_TAG: node}
    tags = run_tags(data_fingerprint=data.fingerprint, extra=extra)
    run_id = client.create_run(ctx.experiment_id, run_name=context.get_trial_name(), tags=tags).info.run_id
    log_config(train_config, run_id=run_id)
    for key, value in config.items():
        client.log_param(run_id, f"search.{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    log_cohort_input(
        run_id,
        name=Path(data.root).name,
        fingerprint=data.fingerprint,
        root=data.root,
        cases=len(data.train_cases) + len(data.val_cases),
        profile={"train_cases": len(data.train_cases), "val_cases": len(data.val_cases)},
        client=client,
    )
    return run_id


def _tune_reporter(metric: str | tuple[str, ...], mlflow_reporter: MlflowReporter) -> Callable[[EpochReport], None]:
    """``fit``'s reporter: MLflow first, then ``tune.report`` (which may stop the trial)."""

    objectives = (metric,) if isinstance(metric, str) else tuple(metric)

    def report(epoch: EpochReport) -> None:
        # The objective first: MLflow's compare view plots the first metric a run logged.
        first = {name: epoch.metrics[name] for name in objectives if name in epoch.metrics}
        mlflow_reporter(replace(epoch, metrics={**first, **epoch.metrics}))  # before tune.report: it may stop the trial
        finite = _finite(epoch.metrics)
        # Tune's console table shows the first four metrics of a result: the objectives (every one,
        # even if not finite), then voxel Dice and the loss, so the search's progress is readable.
        leading = (*objectives, "val/dice_mean", "train/loss")
        metrics = {name: finite.get(name, float("nan")) for name in objectives}
        metrics.update((name, finite[name]) for name in leading if name in finite)
        metrics.update(finite)
        if epoch.checkpoint_dir is not None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(epoch.checkpoint_dir)))
        else:
            tune.report(metrics)

    return report


def _at_the_edge(config: TrainConfig, workdir: Path, tracking_uri: str) -> TrainConfig:
    """What ``fit`` must not decide itself: local copies of MLflow sources, the trial's own device.

    ``init.encoder_from: models:/...`` is downloaded into the trial's folder (training never talks
    to MLflow). The device follows the GPU share the trial asked Ray for, not what the process
    happens to see: Ray 2.60 leaves GPUs visible to trials that asked for none.
    """
    local, _ = localise_config(config.to_dict(), dst=workdir / "init", tracking_uri=tracking_uri)
    return replace(load_train_config(local), device=trial_device(config.device).type)


def trial_device(requested: str = "auto") -> torch.device:
    """The device of the Ray trial (or task) this runs in, from the GPU share it asked Ray for.

    Reads the share Ray assigned (``get_assigned_resources()["GPU"]``: 0, a fraction such as
    0.25, or whole GPUs) and hands it to :func:`bratstune.device.select_trial_device`: no share
    means the CPU even where a GPU is visible; a fractional share caps this process's CUDA
    memory at that fraction.

    Args:
        requested: the config's ``device`` (``auto``, ``cpu``, ``cuda``).
    """
    gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    return select_trial_device(requested, gpus=gpus)


def _scratch_dir() -> Path:
    """A fresh scratch folder inside the trial's own folder (never the system temp folder).

    A trial killed by its scheduler cannot clean up after itself; its scratch then stays with
    its experiment, and the next attempt of the trial removes it.
    """
    trial_dir = Path(tune.get_context().get_trial_dir())
    trial_dir.mkdir(parents=True, exist_ok=True)
    for stale in trial_dir.glob(".scratch-*"):  # left by a killed attempt of this trial
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=".scratch-", dir=trial_dir))


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: train one sampled config, report every epoch.

    ``config`` is the flat ``{dotted name: value}`` mapping of the define-by-run function. The
    trial's MLflow child run is found again by its ``ray_trial_id`` tag when the trial is retried
    or restored, so a trial keeps one run across attempts.
    """
    train_config = load_train_config(apply_values(ctx.base, config))
    # the cached preprocessing variant it names (recorded in its config), label dust in its fingerprint
    handle, train_config = ctx.data.for_trial(train_config)
    if train_config.num_threads is None:
        train_config = replace(train_config, num_threads=max(1, int(ctx.cpus)))
    mlflow.set_tracking_uri(ctx.tracking_uri)
    client = MlflowClient(ctx.tracking_uri)
    # A trial that starts while the tracking server is down waits for it (bounded) rather than
    # spending MLflow's 5 minutes of retries on each call; its run must exist before it trains.
    if not wait_for_server(ctx.tracking_uri, flush_timeout()):
        raise ConfigError(f"MLflow tracking server {ctx.tracking_uri} is unreachable; the trial cannot open its run")
    run_id = _open_run(client, ctx, config, train_config, handle)

    trial_id = tune.get_context().get_trial_id()
    workdir = _scratch_dir()
    resume_dir = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory(str(workdir / "resume")))
        logger.info("trial %s resumes from %s", trial_id, resume_dir)
    train_config = _at_the_edge(train_config, workdir, ctx.tracking_uri)
    # Epochs, the best model, tags and the end status go through one buffer: a tracking server
    # that dies mid-trial neither stalls nor fails the training (bratstune.tracking.outage).
    spool = Path(ctx.spool_dir) / f"trial-{trial_id}.json" if ctx.spool_dir else workdir.parent / UNSENT_FILE
    mlflow_reporter = MlflowReporter(run_id=run_id, artifact_path="best_model", spool=spool)
    reporter = _tune_reporter(ctx.metric, mlflow_reporter)
    train = ctx.fit_fn or fit
    data = handle.load()
    status = "FINISHED"
    try:
        train(train_config, data, reporter, out_dir=workdir / "fit", resume_from=resume_dir)
        mlflow_reporter.buffer.set_tag(STOP_TAG, "completed")
    except SystemExit:  # how Tune stops a trial (ASHA) inside tune.report
        mlflow_reporter.buffer.set_tag(STOP_TAG, "stopped by scheduler")
        raise
    except BaseException as exc:
        status = "FAILED"
        mlflow_reporter.buffer.set_tag(STOP_TAG, f"error: {type(exc).__name__}: {exc}"[:5000])
        raise
    finally:
        try:  # what a dead server missed is sent now, or kept in the trial's folder and reported
            mlflow_reporter.close(status)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
