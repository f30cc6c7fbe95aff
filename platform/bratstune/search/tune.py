"""Hyper-parameter search: one Ray Tune trial = one :func:`bratstune.training.fit.fit`.

::

    spec = load_search_space("search_spaces/losses.yaml")
    data = prepare_data(spec, Path("data/GLI"))        # preprocess once, shared by every trial
    outcome = run_search(spec, data, storage_path=Path(".bratstune/results/search"))
    outcome.best_config                                # TrainConfig of the best trial

Pieces, all in plain sight of :func:`run_search`:

* **Trials** (:func:`run_trial`): the YAML space becomes an Optuna define-by-run function behind
  ``ray.tune.search.optuna.OptunaSearch``; each trial trains with ``fit`` and a reporter that logs
  the epoch to its MLflow child run *before* ``ray.tune.report(metrics, checkpoint=...)`` so that
  ASHA (``ray.tune.schedulers.ASHAScheduler``) can stop weak trials after any epoch.
* **Data** (:class:`DataHandle`): cases are preprocessed once into the on-disk cache; trials
  reopen them as memory maps (``share: cache``) or receive them through the object store
  (``share: object_store``, for clusters without a shared file system). No trial decodes NIfTI.
* **MLflow**: the driver owns one parent run per search (space file, resolved space, seed, data
  fingerprint, git commit); each trial owns a child run (``mlflow.parentRunId``) holding its config
  as params, per-epoch metrics, its best checkpoint and a ``stop_reason`` tag. A driver-side
  :class:`bratstune.search.callback.TrialRunCallback` closes runs a stopped or crashed trial left open. At the end the parent
  gets the best config, ``results.csv`` and plots (``bratstune.search.results``).
* **Resume** (``resume=True``): ``Tuner.restore(path, resume_errored=True)`` continues an
  interrupted search; finished trials are kept, unfinished ones continue from their last
  checkpoint, and the parent MLflow run is reopened. Crashed trials are retried
  (``FailureConfig(max_failures)``) and never end the search.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from bratstune import paths
from bratstune.errors import ConfigError
from bratstune.search.space import SearchSpec, apply_values
from bratstune.training.config import TrainConfig, load_train_config

if TYPE_CHECKING:
    from ray import tune

    from bratstune.training.fit import EpochReport, TrainData

logger = logging.getLogger(__name__)

__all__ = [
    "DataHandle",
    "SearchOutcome",
    "TrialContext",
    "build_tuner",
    "demo_search",
    "find_experiment",
    "prepare_data",
    "run_search",
    "run_trial",
    "synthetic_cohort",
]

META_FILE = "bratstune_search.json"


# -- data, prepared once ---------------------------------------------------------------------------


@dataclass
class DataHandle:
    """What a trial needs to rebuild its :class:`~bratstune.training.fit.TrainData` without decoding NIfTI.

    Attributes:
        root: the cohort folder.
        cache_root: the preprocessing cache (must be reachable by every node in ``cache`` mode).
        train_cases, val_cases: ``bratstune.data.layout.Case`` objects of the split.
        preprocess: the ``PreprocessConfig`` the cache was filled with.
        scheme: the label scheme.
        fingerprint: hash of case ids and preprocessing config (logged to MLflow).
        arrays: ``object_store`` mode: the preprocessed train/val cases themselves (plain arrays,
            shipped once through Ray's object store by ``tune.with_parameters``).
    """

    root: Path
    cache_root: Path
    train_cases: list[Any]
    val_cases: list[Any]
    preprocess: Any
    scheme: Any
    fingerprint: str
    arrays: tuple[list[Any], list[Any]] | None = None

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.train_cases + self.val_cases]

    def load(self) -> TrainData:
        """The trial's TrainData: memory maps from the cache (or the shipped arrays)."""
        from bratstune.training.fit import TrainData

        if self.arrays is not None:
            return TrainData(train=list(self.arrays[0]), val=list(self.arrays[1]), scheme=self.scheme)
        from bratstune.data.cache import CaseCache

        cache = CaseCache(self.cache_root)

        def get(case: Any) -> Any:
            hit = cache.lookup(case, self.preprocess)
            if hit is None:
                logger.warning("cache miss for %s in %s: preprocessing it in the trial", case.case_id, cache.root)
                hit = cache.load(case, self.preprocess)
            return hit

        return TrainData(
            train=[get(c) for c in self.train_cases], val=[get(c) for c in self.val_cases], scheme=self.scheme
        )


def prepare_data(
    spec: SearchSpec, root: str | Path, *, cache_root: str | Path | None = None, workers: int = 1
) -> DataHandle:
    """Discover, preprocess (once, into the cache) and split the cohort for every trial.

    The preprocessing is the base config's ``data.preprocess`` updated with the space's
    ``data.preprocess``; the split holds out ``data.val_fraction`` of the cases, stratified by
    tumour volume (``bratstune.data.cohort.split_train_val``, seed ``data.split_seed``).
    """
    from bratstune.data.cache import CaseCache
    from bratstune.data.layout import discover
    from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val

    root = Path(root).resolve()
    cache = CaseCache(cache_root)
    preprocess = preprocess_config({**dict(spec.base_config().data.preprocess), **dict(spec.data.preprocess)})
    prepared = prepare_cohort(root, preprocess, workers=workers, cache_root=cache.root)
    split = split_train_val(prepared.cases, prepared.scheme, val_fraction=spec.data.val_fraction,
                            seed=spec.data.split_seed)
    by_id = {c.case_id: c for c in discover(root).cases}
    train_ids = [c.case_id for c in split.train]
    val_ids = [c.case_id for c in split.val]
    arrays = None
    if spec.data.share == "object_store":
        arrays = ([_in_memory(c) for c in split.train], [_in_memory(c) for c in split.val])
    logger.info("data %s: %d train / %d val cases, fingerprint %s (%s)", root, len(train_ids), len(val_ids),
                prepared.fingerprint, spec.data.share)
    return DataHandle(
        root=root,
        cache_root=cache.root,
        train_cases=[by_id[i] for i in train_ids],
        val_cases=[by_id[i] for i in val_ids],
        preprocess=preprocess,
        scheme=prepared.scheme,
        fingerprint=prepared.fingerprint,
        arrays=arrays,
    )


def _in_memory(case: Any) -> Any:
    import numpy as np

    label = None if case.label is None else np.array(case.label)
    return replace(case, image=np.array(case.image), label=label)


def synthetic_cohort(
    *, cases: int = 16, shape: Sequence[int] | None = (64, 64, 48), anatomy: str = "procedural",
    challenge: str = "GLI", seed: int = 0, root: str | Path | None = None,
) -> Path:
    """A synthetic cohort under ``bratstune.paths.data_dir()``, generated on first use.

    The folder name encodes the arguments; a ``.complete`` marker makes reuse safe after an
    interrupted generation.
    """
    from bratstune.data.synthetic import generate_cohort

    grid = "x".join(str(int(s)) for s in shape) if shape else "default"
    folder = Path(root) if root is not None else paths.data_dir() / f"synthetic-{challenge}-{cases}-{grid}-{anatomy}-s{seed}"
    marker = folder / ".complete"
    if not marker.is_file():
        generate_cohort(folder, challenge=challenge, cases=cases, shape=tuple(shape) if shape else None,
                        anatomy=anatomy, seed=seed)
        marker.write_text("ok\n")
    return folder


# -- one trial ------------------------------------------------------------------------------------


@dataclass
class TrialContext:
    """Everything a trial receives besides its sampled values (shipped once via the object store)."""

    search_name: str
    base: dict[str, Any]
    metric: str
    data: DataHandle
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus: float = 1.0
    fit_fn: Callable[..., Any] | None = None


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


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: train one sampled config, report every epoch.

    ``config`` is the flat ``{dotted name: value}`` mapping of the define-by-run function. The
    trial's MLflow child run is found again by its ``ray_trial_id`` tag when the trial is retried
    or restored, so a trial keeps one run across attempts.
    """
    import mlflow
    from mlflow.tracking import MlflowClient
    from ray import tune

    from bratstune.search.callback import STOP_TAG, TRIAL_TAG, find_trial_run
    from bratstune.tracking.runs import MlflowReporter, log_config, run_tags

    train_config = load_train_config(apply_values(ctx.base, config))
    if train_config.num_threads is None:
        train_config = replace(train_config, num_threads=max(1, int(ctx.cpus)))
    context = tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()

    mlflow.set_tracking_uri(ctx.tracking_uri)
    client = MlflowClient(ctx.tracking_uri)
    run_id = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
    if run_id is None:
        tags = run_tags(data_fingerprint=ctx.data.fingerprint,
                        extra={"mlflow.parentRunId": ctx.parent_run_id, TRIAL_TAG: trial_id, "search": ctx.search_name})
        run_id = client.create_run(ctx.experiment_id, run_name=trial_name, tags=tags).info.run_id
        log_config(train_config, run_id=run_id)
        searched = {f"search.{k}": (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in config.items()}
        for key, value in searched.items():
            client.log_param(run_id, key, value)
    else:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")

    resume_dir = None
    checkpoint = tune.get_checkpoint()
    workdir = Path(tempfile.mkdtemp(prefix=f"bratstune-trial-{trial_id}-"))
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory(str(workdir / "resume")))
        logger.info("trial %s resumes from %s", trial_id, resume_dir)

    mlflow_reporter = MlflowReporter(run_id=run_id, artifact_path="best_model")

    def reporter(report: EpochReport) -> None:
        mlflow_reporter(report)  # before tune.report: the scheduler may stop the trial inside it
        metrics = _finite(report.metrics)
        metrics.setdefault(ctx.metric, float("nan"))
        if report.checkpoint_dir is not None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(report.checkpoint_dir)))
        else:
            tune.report(metrics)

    fit = ctx.fit_fn
    if fit is None:
        from bratstune.training.fit import fit
    data = ctx.data.load()
    status = "FINISHED"
    try:
        fit(train_config, data, reporter, out_dir=workdir / "fit", resume_from=resume_dir)
        client.set_tag(run_id, STOP_TAG, "completed")
    except SystemExit:  # how Tune stops a trial (ASHA) inside tune.report
        client.set_tag(run_id, STOP_TAG, "stopped by scheduler")
        raise
    except BaseException as exc:
        status = "FAILED"
        client.set_tag(run_id, STOP_TAG, f"error: {type(exc).__name__}: {exc}"[:5000])
        raise
    finally:
        client.set_terminated(run_id, status=status)
        shutil.rmtree(workdir, ignore_errors=True)


# -- driver side ------------------------------------------------------------------------------------


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
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from bratstune.search.space import make_sampler

    searcher = OptunaSearch(space=spec.define_by_run, metric=spec.metric, mode=spec.mode,
                            sampler=make_sampler(spec, algorithm=algorithm))
    kind = scheduler or spec.scheduler.type
    if kind == "asha":
        sched = ASHAScheduler(time_attr="training_iteration", max_t=spec.max_t,
                              grace_period=min(spec.scheduler.grace_period, spec.max_t),
                              reduction_factor=spec.scheduler.reduction_factor)
    elif kind == "fifo":
        sched = FIFOScheduler()
    else:
        raise ConfigError(f"unknown scheduler '{kind}'; expected 'asha' or 'fifo'")
    from bratstune.search.callback import TrialRunCallback

    callback = TrialRunCallback(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, spec.max_t, kind)
    return tune.Tuner(
        _trainable(spec, ctx),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=searcher,
            scheduler=sched,
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


def _trainable(spec: SearchSpec, ctx: TrialContext) -> Any:
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), spec.resources.as_tune())


@dataclass
class SearchOutcome:
    """What :func:`run_search` returns.

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
        """The command that opens these runs in the MLflow UI."""
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


def _join(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}" if "://" in storage_path else str(Path(storage_path) / name)


def find_experiment(storage_path: str | Path, space_name: str) -> str | None:
    """The most recent restorable experiment ``<space_name>-*`` under a local ``storage_path``."""
    from ray import tune

    root = Path(storage_path)
    if not root.is_dir():
        return None
    found = sorted((p for p in root.glob(f"{space_name}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        if tune.Tuner.can_restore(str(path)):
            return path.name
    return None


def _write_meta(path: str, meta: Mapping[str, Any]) -> None:
    if "://" in path:
        return  # remote storage: the parent run id is found by its MLflow tag instead
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / META_FILE).write_text(json.dumps(dict(meta), indent=1))


def _parent_for_resume(client: Any, experiment_id: str, path: str, name: str) -> str | None:
    meta = Path(path) / META_FILE
    if "://" not in path and meta.is_file():
        return json.loads(meta.read_text()).get("parent_run_id")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`search.experiment` = '{name}'", max_results=1)
    return runs[0].info.run_id if runs else None


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
        data: a :class:`DataHandle` from :func:`prepare_data`, or a cohort folder (prepared here).
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
        :class:`SearchOutcome`.
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    from bratstune.tracking import runs as tracking
    from bratstune.search.results import finish_parent_run

    tracking_uri = tracking_uri or tracking.tracking_uri()
    if experiment_id is None:
        experiment_id = tracking.setup_mlflow(experiment, uri=tracking_uri)
    client = MlflowClient(tracking_uri)
    storage = str(storage_path or paths.results_dir() / "search")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    if resume and name is None:
        name = find_experiment(storage, spec.name)
        if name is None:
            raise ConfigError(f"--resume: no restorable '{spec.name}-*' experiment under {storage}; pass --name")
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = _join(storage, name)
    restoring = resume and tune.Tuner.can_restore(path)
    if resume and not restoring:
        raise ConfigError(f"--resume: {path} holds no restorable Tune experiment")
    if not isinstance(data, DataHandle):
        data = prepare_data(spec, data)

    parent_run_id = _parent_for_resume(client, experiment_id, path, name) if restoring else None
    if parent_run_id is not None:
        client.update_run(parent_run_id, status="RUNNING")
        client.set_tag(parent_run_id, "resumed", "true")
    else:
        parent_run_id = _start_parent(client, spec, data, experiment_id, name, path, algorithm, scheduler)
    _write_meta(path, {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri,
                       "space": str(spec.source) if spec.source else spec.name})
    ctx = TrialContext(
        search_name=name, base=spec.base, metric=spec.metric, data=data, tracking_uri=tracking_uri,
        experiment_id=experiment_id, parent_run_id=parent_run_id, cpus=spec.resources.cpu, fit_fn=fit_fn,
    )
    status = "FAILED"
    try:
        if restoring:
            logger.info("resuming search %s from %s", name, path)
            tuner = tune.Tuner.restore(path, trainable=_trainable(spec, ctx), resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = build_tuner(spec, ctx, name=name, storage_path=storage, algorithm=algorithm,
                                scheduler=scheduler, verbose=verbose)
        grid = tuner.fit()
        outcome = SearchOutcome(name=name, path=path, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                                experiment_id=experiment_id)
        finish_parent_run(client, spec, grid, outcome, output_dir=None if "://" in path else Path(path))
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_run_id, status=status)


def _start_parent(client: Any, spec: SearchSpec, data: DataHandle, experiment_id: str, name: str, path: str,
                  algorithm: str | None, scheduler: str | None) -> str:
    import yaml

    from bratstune.tracking.runs import run_tags

    tags = run_tags(data_fingerprint=data.fingerprint, extra={
        "search.experiment": name, "search.space": spec.name, "search.storage": path, "bratstune.kind": "search",
    })
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {
        "space": spec.name,
        "space_file": str(spec.source) if spec.source else "",
        "metric": spec.metric,
        "mode": spec.mode,
        "num_samples": spec.num_samples,
        "max_concurrent_trials": spec.max_concurrent_trials,
        "algorithm": algorithm or spec.search.algorithm,
        "seed": spec.search.seed,
        "scheduler": scheduler or spec.scheduler.type,
        "max_t": spec.max_t,
        "grace_period": spec.scheduler.grace_period,
        "reduction_factor": spec.scheduler.reduction_factor,
        "resources.cpu": spec.resources.cpu,
        "resources.gpu": spec.resources.gpu,
        "max_failures": spec.failure.max_failures,
        "data.root": str(data.root),
        "data.fingerprint": data.fingerprint,
        "data.train_cases": len(data.train_cases),
        "data.val_cases": len(data.val_cases),
        "data.share": spec.data.share,
    }
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    if spec.source is not None and Path(spec.source).is_file():
        client.log_artifact(run_id, str(spec.source), "space")
    client.log_text(run_id, yaml.safe_dump(spec.resolved(), sort_keys=False), "space/resolved_space.yaml")
    client.log_text(run_id, yaml.safe_dump(spec.base_config().to_dict(), sort_keys=False), "space/base_config.yaml")
    client.log_text(run_id, json.dumps({"train": [c.case_id for c in data.train_cases],
                                        "val": [c.case_id for c in data.val_cases]}, indent=1), "data/split.json")
    return run_id


def stop_all_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> int:
    """Mark child runs of ``parent_run_id`` still RUNNING as KILLED (after a hard driver kill)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    count = 0
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
            count += 1
    return count


def demo_search(space: str | Path, data: str | Path, *, num_samples: int = 6, epochs: int = 4,
                storage_path: str | Path | None = None, verbose: int = 0) -> SearchOutcome:
    """The ``make demo`` loss search: ``num_samples`` small CPU trials with ASHA on ``data``.

    Ray must be initialised by the caller (``ray.init(runtime_env=...)``, see ``jobs/_bootstrap``).
    """
    from bratstune.search.space import demo_variant, load_search_space

    spec = demo_variant(load_search_space(space), num_samples=num_samples, epochs=epochs)
    return run_search(spec, prepare_data(spec, data), storage_path=storage_path, verbose=verbose)
