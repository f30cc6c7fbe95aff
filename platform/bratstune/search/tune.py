"""Hyper-parameter search: one Ray Tune trial = one :func:`bratstune.training.fit.fit`.

::

    spec = load_search_space("search_spaces/losses.yaml")
    data = prepare_data(spec, Path("data/GLI"))        # preprocess once, shared by every trial
    outcome = run_search(spec, data, storage_path=Path(".bratstune/results/search"))
    outcome.best_config                                # TrainConfig of the best trial

Laid out as Ray's Tune examples are, in plain sight of :func:`build_tuner`:

* **Space** (:mod:`bratstune.search.space`): the YAML space becomes an Optuna define-by-run
  function behind ``ray.tune.search.optuna.OptunaSearch``.
* **Trainable** (:mod:`bratstune.search.trial`): each trial trains with ``fit`` and reports every
  epoch, so that ASHA (``ray.tune.schedulers.ASHAScheduler``) can stop weak trials early; its
  data were prepared once (:mod:`bratstune.search.data`).
* **RunConfig**: storage, failure policy (crashed trials are retried, ``FailureConfig``, and
  never end the search), checkpoints, and the driver-side
  :class:`bratstune.search.callback.TrialRunCallback` that closes runs a stopped or crashed trial
  left open.
* **MLflow**: the driver owns one parent run per search (:mod:`bratstune.search.parent_run`);
  each trial owns a child run. At the end the parent gets the best config, ``results.csv`` and
  plots (:mod:`bratstune.search.results`).
* **Resume** (``resume=True``): ``Tuner.restore(path, resume_errored=True)`` continues an
  interrupted search; finished trials are kept, unfinished ones continue from their last
  checkpoint, and the parent MLflow run is reopened.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from bratstune import paths
from bratstune.errors import ConfigError
from bratstune.search.callback import TrialRunCallback, replay_outage
from bratstune.search.data import DataHandle, prepare_data
from bratstune.search.params import deep_merge
from bratstune.search.parent_run import find_parent_run, start_parent_run, write_meta
from bratstune.search.results import SearchOutcome, finish_parent_run
from bratstune.search.sections import make_sampler
from bratstune.search.space import SearchSpec, load_search_space
from bratstune.search.trial import TrialContext, outage_spool, trainable
from bratstune.tracking import runs as tracking

logger = logging.getLogger(__name__)

__all__ = [
    "build_tuner",
    "demo_search",
    "demo_variant",
    "find_experiment",
    "run_search",
]


def _scheduler(spec: SearchSpec, kind: str) -> TrialScheduler:
    if kind == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=spec.max_t,
            grace_period=min(spec.scheduler.grace_period, spec.max_t),
            reduction_factor=spec.scheduler.reduction_factor,
        )
    if kind == "fifo":
        return FIFOScheduler()
    raise ConfigError(f"unknown scheduler '{kind}'; expected 'asha' or 'fifo'")


def build_tuner(
    spec: SearchSpec,
    ctx: TrialContext,
    *,
    name: str,
    storage_path: str,
    algorithm: str | None = None,
    scheduler: str | None = None,
    verbose: int = 1,
) -> tune.Tuner:
    """The ``ray.tune.Tuner`` of a search: OptunaSearch + ASHA/FIFO + resources + failure policy.

    Args:
        algorithm: override ``spec.search.algorithm`` (``tpe``, ``cmaes``, ``random``).
        scheduler: override ``spec.scheduler.type`` (``asha``, ``fifo``).
    """
    kind = scheduler or spec.scheduler.type
    if spec.multi_objective and kind != "fifo":
        raise ConfigError(
            f"a multi-objective search runs with the fifo scheduler (ASHA stops on one metric), not {kind!r}"
        )
    metrics, modes = zip(*spec.objectives)
    searcher = OptunaSearch(  # one objective: a name; several: lists (Optuna's multi-objective TPE)
        space=spec.define_by_run,
        metric=list(metrics) if spec.multi_objective else spec.metric,
        mode=list(modes) if spec.multi_objective else spec.mode,
        sampler=make_sampler(spec, algorithm=algorithm),
    )
    callback = TrialRunCallback(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, spec.max_t, kind, spool_dir=ctx.spool_dir
    )
    return tune.Tuner(
        trainable(ctx, spec.resources.as_tune()),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=searcher,
            scheduler=_scheduler(spec, kind),
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[callback],
            verbose=verbose,
        ),
    )


def find_experiment(storage_path: str | Path, space_name: str) -> str | None:
    """The most recent restorable experiment ``<space_name>-*`` under a local ``storage_path``."""
    root = Path(storage_path)
    if not root.is_dir():
        return None
    found = sorted((p for p in root.glob(f"{space_name}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        if tune.Tuner.can_restore(str(path)):
            return path.name
    return None


@dataclass(frozen=True)
class _Experiment:
    """Where a search's Tune experiment lives, and whether it is restored."""

    storage: str
    name: str
    path: str
    restoring: bool


def _experiment(spec: SearchSpec, storage_path: str | Path | None, name: str | None, resume: bool) -> _Experiment:
    storage = str(storage_path or paths.results_dir() / "search")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    if resume and name is None:
        name = find_experiment(storage, spec.name)
        if name is None:
            raise ConfigError(f"--resume: no restorable '{spec.name}-*' experiment under {storage}; pass --name")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)
    restoring = resume and tune.Tuner.can_restore(path)
    if resume and not restoring:
        raise ConfigError(f"--resume: {path} holds no restorable Tune experiment")
    return _Experiment(storage, name, path, restoring)


def _parent_run(
    client: MlflowClient, spec: SearchSpec, data: DataHandle, exp: _Experiment, experiment_id: str, **overrides: Any
) -> str:
    """The restored search's parent run (reopened), else a new one."""
    parent_run_id = find_parent_run(client, experiment_id, exp.path, exp.name) if exp.restoring else None
    if parent_run_id is not None:
        client.update_run(parent_run_id, status="RUNNING")
        client.set_tag(parent_run_id, "resumed", "true")
        return parent_run_id
    run_id = start_parent_run(
        client, spec, data, experiment_id=experiment_id, name=exp.name, path=exp.path, **overrides
    )
    # what every trial trains on and what chooses epochs and the best trial
    client.log_text(run_id, json.dumps(data.case_record(), indent=1), "cases.json")
    return run_id


def _tuner(spec: SearchSpec, ctx: TrialContext, exp: _Experiment, **options: Any) -> tune.Tuner:
    """The restored Tuner of an interrupted search, else a new one (:func:`build_tuner`)."""
    if not exp.restoring:
        return build_tuner(spec, ctx, name=exp.name, storage_path=exp.storage, **options)
    logger.info("resuming search %s from %s", exp.name, exp.path)
    fn = trainable(ctx, spec.resources.as_tune())
    return tune.Tuner.restore(exp.path, trainable=fn, resume_unfinished=True, resume_errored=True)


def run_search(
    spec: SearchSpec,
    data: DataHandle | str | Path,
    *,
    storage_path: str | Path | None = None,
    name: str | None = None,
    resume: bool = False,
    experiment: str = "bratstune-search",
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
    algorithm: str | None = None,
    scheduler: str | None = None,
    fit_fn: Callable[..., Any] | None = None,
    verbose: int = 1,
) -> SearchOutcome:
    """Run (or resume) a search; Ray must already be initialised (``ray.init``) by the caller.

    Args:
        spec: the validated search space.
        data: a :class:`~bratstune.search.data.DataHandle` from
            :func:`~bratstune.search.data.prepare_data`, or a cohort folder (prepared here).
        storage_path: where Tune keeps results and checkpoints (local folder, shared path or
            URI); default ``bratstune.paths.results_dir() / "search"``.
        name: experiment name; default ``<space>-<YYYYmmdd-HHMMSS>`` (with ``resume``: the most
            recent restorable ``<space>-*`` under ``storage_path``).
        resume: continue the interrupted experiment ``name`` with ``Tuner.restore``.
        experiment, tracking_uri, experiment_id: MLflow experiment (set up here unless
            ``experiment_id`` is given, i.e. the job already called ``tracking.setup_mlflow``).
        algorithm, scheduler: override the space's sampler / scheduler (benchmarks).
        fit_fn: replaces :func:`bratstune.training.fit.fit` (same signature), e.g. for fault injection.
        verbose: Tune's console verbosity (0-3).

    Returns:
        :class:`~bratstune.search.results.SearchOutcome`.
    """
    tracking_uri = tracking_uri or tracking.tracking_uri()
    if experiment_id is None:
        experiment_id = tracking.setup_mlflow(experiment, uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = _experiment(spec, storage_path, name, resume)
    if not isinstance(data, DataHandle):
        data = prepare_data(spec, data)
    parent_run_id = _parent_run(client, spec, data, exp, experiment_id, algorithm=algorithm, scheduler=scheduler)
    space = str(spec.source) if spec.source else spec.name
    meta = {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri}
    write_meta(exp.path, {**meta, "space": space})
    ctx = TrialContext(
        search_name=exp.name,
        base=spec.base,
        metric=tuple(m for m, _ in spec.objectives) if spec.multi_objective else spec.metric,
        data=data,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        cpus=spec.resources.cpu,
        fit_fn=fit_fn,
        spool_dir=outage_spool(exp.storage, exp.name),
    )
    status = "FAILED"
    try:
        tuner = _tuner(spec, ctx, exp, algorithm=algorithm, scheduler=scheduler, verbose=verbose)
        grid = tuner.fit()
        # what trials could not log while the tracking server was down
        replay_outage(tracking_uri, experiment_id, parent_run_id, ctx.spool_dir)
        outcome = SearchOutcome(exp.name, exp.path, parent_run_id, tracking_uri, experiment_id)
        finish_parent_run(client, spec, grid, outcome, output_dir=None if "://" in exp.path else Path(exp.path))
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_run_id, status=status)


def demo_variant(
    spec: SearchSpec,
    *,
    num_samples: int = 6,
    epochs: int = 4,
    steps_per_epoch: int = 40,
    base: Mapping[str, Any] | None = None,
) -> SearchSpec:
    """The ``make demo`` search: the space's own (full-size) network on the CPU, a few trials of a
    few epochs, ASHA with grace period 1 so early stopping is visible.

    The network and patch are the ones ``bratstune train`` uses, so the best trial is comparable
    with (and, being the best of several, usually better than) the demo's single trained model;
    only the number of trials, epochs and validation cases is cut to fit two cores. ``base``
    overrides the trials' training config further (the demo's patch size, for one).
    """
    demo_base = {
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "data": {"num_workers": 0},
        "validation": {"max_cases": 6, "overlap": 0.25},
        "device": "cpu",
    }
    return spec.with_overrides(
        {
            "num_samples": num_samples,
            "max_concurrent_trials": 2,
            "resources": {"cpu": 1, "gpu": 0},
            "scheduler": {"type": "asha", "max_t": epochs, "grace_period": 1, "reduction_factor": 2},
            "base": deep_merge(demo_base, base or {}),
        },
        "demo",
    )


def demo_search(
    space: str | Path,
    data: str | Path,
    *,
    num_samples: int = 6,
    epochs: int = 4,
    steps_per_epoch: int = 40,
    base: Mapping[str, Any] | None = None,
    storage_path: str | Path | None = None,
    verbose: int = 0,
) -> SearchOutcome:
    """The ``make demo`` loss search: ``num_samples`` small CPU trials with ASHA on ``data``.

    ``base`` overrides the trials' training config (:func:`demo_variant`).
    Ray must be initialised by the caller (``ray.init(runtime_env=...)``, see ``jobs/_bootstrap``).
    """
    spec = demo_variant(
        load_search_space(space), num_samples=num_samples, epochs=epochs, steps_per_epoch=steps_per_epoch, base=base
    )
    return run_search(spec, prepare_data(spec, data), storage_path=storage_path, verbose=verbose)
