"""The cross-validation driver: the stages in order, under one MLflow parent run.

::

    spec = CrossValSpec(folds=5, register="bratstune-gli", promote=True)
    outcome = cross_validate(best_config, Path("data/GLI"), spec)    # Ray must be initialised
    outcome.ensemble_dir                      # <out>/ensemble: Ensemble.load()-able, decode tuned on all OOF
    outcome.oos_metrics["dice_lesion_mean"]   # the honest (cross-fitted) estimate
    outcome.in_sample_metrics["dice_lesion_mean"]   # the deployed decode on its own tuning cases

Stages (one module each): folds (:mod:`~bratstune.search.crossval.folds`) -> fold trials
(:mod:`~bratstune.search.crossval.fold_trials`) -> out-of-fold probabilities
(:mod:`~bratstune.search.crossval.oof`) -> decode tuning
(:mod:`~bratstune.search.crossval.decode_tuning`) -> packaging and registration
(:mod:`~bratstune.search.crossval.packaging`); the parent run records each
(:mod:`~bratstune.search.crossval.parent_run`).

Output folder (``<storage_path>/<name>``)::

    folds/fold0/best_model/   fold 0's model (model.pt + config.yaml + metrics.json)
    folds/fold0/cases.json    what fold 0 trained, selected (epoch) and tuned (decode) on
    oof/<case_id>.npy         OOF probabilities of every CV case (exactly one file per case)
    folds.json                held-out case ids per fold
    splits_final.json         the folds in nnU-Net's shape (replayable with splits: FILE)
    gate.json                 the gate split (never used by the CV; the promotion gate's cases)
    cases.json                the whole record (ensemble + per fold)
    thresholds.yaml           deployed thresholds + post-processing, and the cross-fitted ones
    ensemble/                 the packaged ensemble
    fold0_.../                Tune's trial folders (checkpoints)

Region-mode models only (``loss.mode: region``): thresholds need per-region sigmoid outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from bratstune import paths
from bratstune.data.splits import write_json
from bratstune.ensemble.gate import GateSpec
from bratstune.ensemble.package import Ensemble
from bratstune.inference.decode import DecodeSettings
from bratstune.search.crossval.decode_tuning import DecodeTuning, tune_decode, write_thresholds
from bratstune.search.crossval.fold_trials import FOLDS_DIR, CVContext, FoldRuns, train_folds
from bratstune.search.crossval.folds import FoldPlan, plan_folds
from bratstune.search.crossval.packaging import DEFAULT_METRIC, build_ensemble, case_record, register
from bratstune.search.crossval.parent_run import log_case_records, log_decode_tuning, log_fold_metrics, start_cv_run
from bratstune.search.crossval.spec import CrossValSpec, training_config
from bratstune.search.params import deep_merge
from bratstune.search.sections import ResourceSpec
from bratstune.search.thresholds import settings_mapping
from bratstune.tracking import runs as tracking
from bratstune.training.config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)

__all__ = ["CVOutcome", "cross_validate", "demo_cross_validate"]


@dataclass
class CVOutcome:
    """What :func:`cross_validate` returns.

    Attributes:
        ensemble_dir: ``<out>/ensemble`` (``Ensemble.load``-able).
        ensemble: the packaged ensemble (members = fold models, tuned decode settings).
        fold_metrics: per fold, OOF metrics of its held-out cases at default thresholds
            (``dice_lesion_<R>``, ``dice_<R>``, ``hd95_lesion_<R>``, ``..._mean``).
        oof_metrics_default: pooled OOF metrics, default thresholds (0.5, no post-processing).
        oof_metrics_tuned: pooled OOF metrics with the deployed decode, on the cases it was tuned
            on (in-sample: optimistic; the same as :attr:`in_sample_metrics`).
        decode: the deployed decode settings (:attr:`thresholds` and :attr:`postprocess` views).
        parent_run_id: the CV parent MLflow run.
        oos_metrics: pooled cross-fitted metrics: the honest estimate of the tuned pipeline.
        fold_oos_metrics: per fold, its cross-fitted metrics.
        oos_cases: per case, its cross-fitted metrics.
        cases: the ensemble's case record (``cases.json``): trained, selected, tuned, gate.
        gate: the gate split's case ids.
    """

    ensemble_dir: Path
    ensemble: Ensemble
    fold_metrics: list[dict[str, float]]
    oof_metrics_default: dict[str, float]
    oof_metrics_tuned: dict[str, float]
    decode: DecodeSettings
    parent_run_id: str
    out_dir: Path | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    fold_run_ids: list[str | None] = field(default_factory=list)
    folds: list[list[str]] = field(default_factory=list)
    metric: str = DEFAULT_METRIC
    registered: str | None = None  # "NAME/VERSION"
    promotion: Any = None  # bratstune.ensemble.promotion.Promotion
    oos_metrics: dict[str, float] = field(default_factory=dict)
    fold_oos_metrics: list[dict[str, float]] = field(default_factory=list)
    oos_cases: dict[str, dict[str, float]] = field(default_factory=dict)
    cases: dict[str, Any] = field(default_factory=dict)
    gate: list[str] = field(default_factory=list)

    @property
    def in_sample_metrics(self) -> dict[str, float]:
        """The deployed decode on the cases it was tuned on (optimistic)."""
        return self.oof_metrics_tuned

    @property
    def thresholds(self) -> dict[str, float]:
        """Tuned threshold per region channel."""
        return dict(self.decode.thresholds)

    @property
    def postprocess(self) -> dict[str, Any]:
        """Tuned post-processing (``min_size`` per region, ``fill_holes``), as in ``thresholds.yaml``."""
        return settings_mapping(self.decode)["postprocess"]


@dataclass
class _Session:
    """Where a cross-validation records: the MLflow store and experiment, its name and output folder."""

    client: MlflowClient
    tracking_uri: str
    experiment_id: str
    name: str
    storage: Path
    out_dir: Path


def _session(spec: CrossValSpec, tracking_uri: str | None, experiment_id: str | None) -> _Session:
    tracking_uri = tracking_uri or tracking.tracking_uri()
    if experiment_id is None:
        experiment_id = tracking.setup_mlflow(spec.experiment, uri=tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    name = spec.name or f"cv-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(spec.storage_path or paths.results_dir() / "cv").resolve()
    out_dir = storage / name
    out_dir.mkdir(parents=True, exist_ok=True)
    return _Session(MlflowClient(tracking_uri), tracking_uri, experiment_id, name, storage, out_dir)


def _outcome(
    session: _Session, parent_run_id: str, plan: FoldPlan, runs: FoldRuns, tuning: DecodeTuning, ensemble: Ensemble
) -> CVOutcome:
    """The outcome of the stages so far (registration fills ``registered`` and ``promotion``)."""
    return CVOutcome(
        ensemble_dir=session.out_dir / "ensemble",
        ensemble=ensemble,
        fold_metrics=tuning.fold_metrics,
        oof_metrics_default=tuning.default,
        oof_metrics_tuned=tuning.tuned,
        decode=tuning.settings,
        parent_run_id=parent_run_id,
        out_dir=session.out_dir,
        tracking_uri=session.tracking_uri,
        experiment_id=session.experiment_id,
        fold_run_ids=runs.run_ids,
        folds=plan.fold_ids,
        metric=DEFAULT_METRIC if DEFAULT_METRIC in ensemble.metrics else "cv/oos/dice_mean",
        oos_metrics=tuning.oos,
        fold_oos_metrics=tuning.fold_oos,
        oos_cases=tuning.case_metrics,
        gate=plan.gate_ids,
    )


def _run_stages(
    config: TrainConfig,
    plan: FoldPlan,
    spec: CrossValSpec,
    session: _Session,
    parent_run_id: str,
    *,
    fit_fn: Callable[..., Any] | None,
    verbose: int,
) -> CVOutcome:
    """Fold trials (which write the OOF probabilities) -> decode tuning -> packaging -> registration."""
    client, out_dir = session.client, session.out_dir
    ctx = CVContext(
        name=session.name,
        base=config.to_dict(),
        metric=config.validation.metric,
        folds=plan.handles,
        out_dir=str(out_dir),
        tracking_uri=session.tracking_uri,
        experiment_id=session.experiment_id,
        parent_run_id=parent_run_id,
        cpus=float(spec.resources.cpu),
        fit_fn=fit_fn,
        held_out=plan.held_out_handles,
        selection=plan.selection_mode,
    )
    resources = spec.resources.as_tune()
    runs = train_folds(ctx, resources=resources, epochs=config.epochs, storage=session.storage, verbose=verbose)
    tuning = tune_decode(plan, out_dir, space=spec.threshold_space, trials=spec.threshold_trials)
    log_fold_metrics(client, parent_run_id, runs, tuning)
    log_decode_tuning(client, parent_run_id, runs, tuning, write_thresholds(out_dir, tuning))
    record = _write_case_records(out_dir, plan, tuning)
    log_case_records(client, parent_run_id, runs, record, record["folds"])
    ensemble = build_ensemble(
        out_dir, plan, tuning, cv_run_id=parent_run_id, search_run_id=spec.search_run_id, inference=spec.inference
    )
    ensemble_dir = ensemble.save(out_dir / "ensemble")  # == outcome.ensemble_dir
    client.set_tag(parent_run_id, "ensemble.dir", str(ensemble_dir))
    client.set_tag(parent_run_id, "ensemble.digest", ensemble.digest or "")
    outcome = _outcome(session, parent_run_id, plan, runs, tuning, ensemble)
    outcome.cases = record
    if spec.register:
        options = {"metric": outcome.metric, "promote": spec.promote, "force": spec.force, "gate": spec.gate}
        done = register(ensemble, spec.register, parent_run_id=parent_run_id, **options)
        outcome.registered, outcome.promotion = done.registered, done.promotion
    logger.info(
        "cross-validation %s: %s %.4f out-of-sample (cross-fitted), %.4f in-sample, %.4f default; ensemble %s",
        session.name,
        tuning.metric,
        tuning.oos.get(tuning.metric, float("nan")),
        tuning.in_sample.get(tuning.metric, float("nan")),
        tuning.default.get(tuning.metric, float("nan")),
        ensemble_dir,
    )
    return outcome


def _write_case_records(out_dir: Path, plan: FoldPlan, tuning: DecodeTuning) -> dict[str, Any]:
    """``<out>/cases.json`` (the ensemble's record + every fold's) and ``folds/fold<i>/cases.json``."""
    ensemble, folds = case_record(plan, tuning)
    for k, record in enumerate(folds):
        record.write(out_dir / FOLDS_DIR / f"fold{k}" / "cases.json")
    payload = {**ensemble.to_json(), "folds": [r.to_json() for r in folds]}
    write_json(out_dir / "cases.json", payload)
    return payload


def cross_validate(
    config: TrainConfig | Mapping[str, Any],
    data_root: str | Path,
    spec: CrossValSpec | None = None,
    *,
    experiment_id: str | None = None,
    tracking_uri: str | None = None,
    cache_root: str | Path | None = None,
    fit_fn: Callable[..., Any] | None = None,
    verbose: int = 1,
) -> CVOutcome:
    """k-fold CV of ``config`` on ``data_root`` -> tuned ensemble (see the module docstring).

    Ray must already be initialised (``ray.init``) by the caller; every fold writes into the
    output folder, which must therefore be visible to all nodes (local Ray, or a shared path).

    Args:
        config: the training config (e.g. a search's best config).
        data_root: labelled cohort folder.
        spec: what to do (:class:`~bratstune.search.crossval.spec.CrossValSpec`; default 5 folds).
        experiment_id: MLflow experiment (set up here, as ``spec.experiment``, when ``None``).
        tracking_uri: MLflow store (default the configured one).
        cache_root: preprocessing cache.
        fit_fn: replaces ``bratstune.training.fit.fit`` inside the trials (tests, fault injection).
        verbose: Tune's console verbosity.

    Raises:
        ConfigError: label-mode config, bad ``folds``; BratstuneError: a fold failed (parent run FAILED).
    """
    spec = spec or CrossValSpec()
    train_config = training_config(config, spec)
    plan = plan_folds(
        train_config,
        data_root,
        k=spec.folds,
        seed=spec.seed,
        cache_root=cache_root,
        workers=spec.workers,
        selection=spec.selection,
        inner_val_fraction=spec.inner_val_fraction,
        gate_fraction=spec.gate_fraction,
        gate_cases=spec.gate_cases,
        splits=spec.splits,
        gate_data=spec.gate_data,
    )
    session = _session(spec, tracking_uri, experiment_id)
    plan.write(session.out_dir)
    parent_run_id = start_cv_run(
        session.client, session.experiment_id, session.name, train_config, spec, plan, session.out_dir
    )
    status = "FAILED"
    try:
        outcome = _run_stages(train_config, plan, spec, session, parent_run_id, fit_fn=fit_fn, verbose=verbose)
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        session.client.set_terminated(parent_run_id, status=status)


def demo_cross_validate(
    cohort: str | Path,
    config: TrainConfig | Mapping[str, Any],
    *,
    folds: int = 3,
    epochs: int = 3,
    steps: int = 20,
    register: str | None = "bratstune-gli",
    storage_path: str | Path | None = None,
    threshold_trials: int = 20,
    search_run_id: str | None = None,
    verbose: int = 0,
    selection: str = "fixed",
    gate_fraction: float = 0.2,
    overrides: Mapping[str, Any] | None = None,
    cpus_per_fold: float = 2.0,
) -> CVOutcome:
    """The ``make demo`` cross-validation after the loss search: ``folds`` small CPU folds of ``config``.

    Ray must be initialised by the caller (``ray.init(runtime_env=...)``, see ``jobs/_bootstrap``);
    ``config`` is typically ``demo_search(...).best_config``. Registers and promotes the ensemble
    as ``register`` (skipped when ``None``). Each fold trains ``epochs`` epochs and keeps the last
    weights (``selection: fixed``) unless told otherwise; ``gate_fraction`` of the cohort is kept
    out for the promotion gate, which scores without test-time views (the same for both models).
    The ensemble is packaged without test-time flips either: eight views would make the demo's
    batch prediction eight times slower on two cores (a full run keeps the flips). ``overrides``
    change the training config further (the demo's patch size); each fold gets
    ``cpus_per_fold`` CPUs (and as many torch threads): on two cores, folds one after another
    with two threads each finish sooner than two at a time with one thread and a third alone.
    """
    plain = deep_merge(load_train_config(config).to_dict(), overrides or {})
    plain["steps_per_epoch"] = int(steps)
    plain["data"] = {**plain["data"], "num_workers": 0}
    plain["validation"] = {**plain["validation"], "every_n_epochs": max(1, int(epochs))}  # validate at the end only
    plain["device"] = "cpu"
    spec = CrossValSpec(
        folds=folds,
        epochs=epochs,
        storage_path=storage_path,
        threshold_trials=threshold_trials,
        register=register,
        promote=register is not None,
        search_run_id=search_run_id,
        selection=selection,
        gate_fraction=gate_fraction,
        gate=GateSpec(tta=False),
        inference={"flips": False, "overlap": 0.25},
        resources=ResourceSpec(cpu=cpus_per_fold),
    )
    return cross_validate(plain, Path(cohort), spec, verbose=verbose)
