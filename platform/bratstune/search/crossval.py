"""k-fold cross-validation of one config -> tuned, packaged (and optionally promoted) ensemble.

::

    outcome = cross_validate(best_config, Path("data/GLI"), k=5)   # Ray must be initialised
    outcome.ensemble_dir          # <out>/ensemble: Ensemble.load()-able, thresholds tuned on OOF
    outcome.oof_metrics_tuned["dice_lesion_mean"]

Steps, all in plain sight of :func:`cross_validate`:

* **Folds**: the cohort is preprocessed once into the cache (``bratstune.data.cohort.prepare_cohort``)
  and cut into ``k`` folds stratified by tumour volume (``bratstune.data.sampling.stratified_folds``).
* **Training**: one Ray Tune trial per fold (``Tuner`` over ``tune.grid_search(range(k))`` of the
  meta parameter ``_fold``, FIFO, per-trial resources). Each trial *is* a search trial:
  :func:`bratstune.search.tune.run_trial` with that fold's :class:`bratstune.search.tune.DataHandle`, so a
  fold gets the same MLflow child run (params, per-epoch metrics, ``best_model`` artifact,
  ``stop_reason``) under the CV parent run, checkpoints/retries and the driver-side
  :class:`bratstune.search.callback.TrialRunCallback`. Its ``fit_fn`` wraps ``train.fit`` to keep
  the fold's best model (``<out>/folds/foldI/best_model``) and to write the out-of-fold (OOF)
  probabilities of its held-out cases (``<out>/oof/<case_id>.npy``, float16 ``(R, x, y, z)``
  on the preprocessed crop) before the trial ends.
* **Thresholds**: the pooled OOF probabilities are decoded and scored by
  :func:`bratstune.search.thresholds.search_thresholds` (no re-inference); the default setting is
  its first trial, so tuning never scores worse than the default on the OOF cases.
* **Ensemble**: the fold models become the members of an :class:`bratstune.ensemble.package.Ensemble`
  with the tuned thresholds / post-processing, the training fingerprint, lineage
  (``cv_run_id``, ``search_run_id``) and metrics (``cv/dice_lesion_mean`` = tuned pooled OOF);
  saved to ``<out>/ensemble`` and, with ``register=``, registered and promoted through the gate
  (:mod:`bratstune.ensemble.registry`).

Output folder (``<storage_path>/<name>``)::

    folds/fold0/best_model/   fit's best/ folder of fold 0 (model.pt + config.yaml + metrics.json)
    oof/<case_id>.npy         OOF probabilities of every case (exactly one file per case)
    folds.json                case ids per fold
    thresholds.yaml           tuned thresholds + post-processing
    ensemble/                 the packaged ensemble
    fold0_.../                Tune's trial folders (checkpoints)

Region-mode models only (``loss.mode: region``): thresholds need per-region sigmoid outputs.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from bratstune import paths
from bratstune.errors import BratstuneError, ConfigError, DataError
from bratstune.training.config import TrainConfig, load_train_config

if TYPE_CHECKING:
    from bratstune.ensemble.package import Ensemble
    from bratstune.search.tune import DataHandle

logger = logging.getLogger(__name__)

__all__ = [
    "CVContext",
    "CVOutcome",
    "DEFAULT_METRIC",
    "DEFAULT_THRESHOLD_SPACE",
    "FOLD_KEY",
    "config_from_search",
    "cross_validate",
    "demo_cross_validate",
    "load_oof",
    "make_folds",
    "resolve_config",
    "run_fold",
    "smoke_config",
]

#: The Tune parameter holding the fold index (``_`` prefix: a meta parameter, not a config key).
FOLD_KEY = "_fold"
#: The ensemble metric promotion compares (pooled OOF lesion-wise Dice after threshold tuning).
DEFAULT_METRIC = "cv/dice_lesion_mean"
OOF_DIR = "oof"
FOLDS_DIR = "folds"
BEST_DIR = "best_model"

#: Used when no threshold space is given (the same as ``search_spaces/thresholds.yaml``).
DEFAULT_THRESHOLD_SPACE: dict[str, Any] = {
    "kind": "thresholds",
    "name": "cv-thresholds",
    "metric": "dice_lesion_mean",
    "mode": "max",
    "num_samples": 100,
    "search": {"algorithm": "tpe", "seed": 0, "n_startup_trials": 20},
    "params": {
        "thresholds.WT": {"distribution": "uniform", "low": 0.2, "high": 0.8},
        "thresholds.TC": {"distribution": "uniform", "low": 0.2, "high": 0.8},
        "thresholds.ET": {"distribution": "uniform", "low": 0.2, "high": 0.8},
        "min_size.WT": {"distribution": "int", "low": 0, "high": 200, "step": 10},
        "min_size.TC": {"distribution": "int", "low": 0, "high": 200, "step": 10},
        "min_size.ET": {"distribution": "int", "low": 0, "high": 100, "step": 5},
        "fill_holes": {"distribution": "categorical", "choices": [False, True]},
    },
}

#: What ``smoke=True`` writes over the config: a tiny, fast CPU run.
SMOKE_OVERRIDES: dict[str, Any] = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supervision": False}},
    "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0},
    "validation": {"lesion_metrics": False, "overlap": 0.25},
    "epochs": 1,
    "steps_per_epoch": 3,
    "device": "cpu",
    "amp": "off",
}


# -- configs -------------------------------------------------------------------------------------------


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def smoke_config(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``config`` shrunk to a seconds-long CPU run (:data:`SMOKE_OVERRIDES`)."""
    plain = load_train_config(config).to_dict()
    return _merge(plain, SMOKE_OVERRIDES)


def config_from_search(run_id: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The ``best_config.yaml`` artifact of a search's parent run (``bratstune.search.results``)."""
    import mlflow
    import yaml

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best_config.yaml")
    except Exception as exc:  # MLflow raises several types for unknown runs / artifacts
        raise DataError(None, f"--from-search {run_id}: cannot fetch best_config.yaml of that run ({exc}); "
                        "give the search's parent run id (the run holding best_config.yaml)") from None
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise DataError(Path(path), "best_config.yaml is not a mapping")
    return data


def resolve_config(*, config: str | Path | None = None, preset: str | None = None, from_search: str | None = None,
                   overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The training config of a job: exactly one of a YAML file, a preset name, a search run id."""
    from bratstune.config_utils import apply_overrides, load_yaml

    given = [x for x in (config, preset, from_search) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --config FILE.yaml, --preset NAME, --from-search RUN_ID")
    if config:
        data = load_yaml(Path(config))
    elif preset:
        from bratstune.presets import load_preset

        data = load_preset(preset)
    else:
        data = config_from_search(str(from_search))
    data = apply_overrides(dict(data), list(overrides)) if overrides else dict(data)
    load_train_config(data)  # validate now, not in k trials
    return data


# -- folds --------------------------------------------------------------------------------------------


def make_folds(cases: Sequence[Any], k: int, *, seed: int = 0) -> list[list[int]]:
    """Held-out case indices of each fold, stratified by tumour volume."""
    from bratstune.data.sampling import stratified_folds, tumour_volume

    volumes = [tumour_volume(c.label, c.spacing) for c in cases]
    return [[int(i) for i in val] for _, val in stratified_folds(volumes, k, seed=seed)]


# -- one fold (runs in a Ray worker) ------------------------------------------------------------------


@dataclass
class CVContext:
    """What every fold trial receives (shipped once through the object store)."""

    name: str
    base: dict[str, Any]
    metric: str
    folds: list[DataHandle]
    out_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    cpus: float = 1.0
    fit_fn: Callable[..., Any] | None = None


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _fit_and_keep(config: Any, data: Any, reporter: Any = None, *, fold: int, cv_dir: str,
                  fit_fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """``train.fit`` + keep the fold's best model + write its OOF probabilities (in the trial)."""
    from bratstune.search.thresholds import cache_probabilities
    from bratstune.training.fit import inference_settings

    if fit_fn is None:
        from bratstune.training.fit import fit as fit_fn
    result = fit_fn(config, data, reporter, **kwargs)
    fold_dir = Path(cv_dir) / FOLDS_DIR / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    best = fold_dir / BEST_DIR
    if result.best_dir is None:
        raise DataError(fold_dir, f"fold {fold} produced no best checkpoint (no validation cases?)")
    tmp = fold_dir / f".{BEST_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(result.best_dir, tmp)
    shutil.rmtree(best, ignore_errors=True)
    os.replace(tmp, best)
    oof = Path(cv_dir) / OOF_DIR
    oof.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cached = cache_probabilities(result.model, data.val, inference_settings(result.config))
    for case in cached:
        _save_npy(oof / f"{case.case_id}.npy", case.probs.astype(np.float16))
    (fold_dir / "oof_cases.json").write_text(json.dumps([c.case_id for c in cached]))
    logger.info("fold %d: best model -> %s, OOF probabilities of %d case(s) in %.1f s", fold, best, len(cached),
                time.perf_counter() - start)
    return result


def run_fold(config: dict[str, Any], ctx: CVContext) -> None:
    """Ray Tune function trainable of one fold: :func:`bratstune.search.tune.run_trial` on its split."""
    from bratstune.search.tune import TrialContext, run_trial

    fold = int(config[FOLD_KEY])
    trial_ctx = TrialContext(
        search_name=ctx.name, base=ctx.base, metric=ctx.metric, data=ctx.folds[fold],
        tracking_uri=ctx.tracking_uri, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
        cpus=ctx.cpus, fit_fn=functools.partial(_fit_and_keep, fold=fold, cv_dir=ctx.out_dir, fit_fn=ctx.fit_fn),
    )
    run_trial(config, trial_ctx)


# -- OOF on the driver ----------------------------------------------------------------------------------


def load_oof(out_dir: Path, cases: Sequence[Any]) -> list[Any]:
    """``CachedCase`` objects (OOF probabilities + reference) of ``cases`` from ``<out>/oof``.

    Raises:
        DataError: a case has no OOF file (its fold did not finish).
    """
    from bratstune.search.thresholds import CachedCase

    out = []
    for case in cases:
        path = Path(out_dir) / OOF_DIR / f"{case.case_id}.npy"
        if not path.is_file():
            raise DataError(path, "missing out-of-fold probabilities (the case's fold did not finish)")
        out.append(CachedCase(case.case_id, np.load(path), np.asarray(case.label, dtype=np.uint8),
                              tuple(float(s) for s in case.spacing)))
    return out


# -- the driver ------------------------------------------------------------------------------------------


@dataclass
class CVOutcome:
    """What :func:`cross_validate` returns.

    Attributes:
        ensemble_dir: ``<out>/ensemble`` (``Ensemble.load``-able).
        ensemble: the packaged ensemble (members = fold models, tuned thresholds).
        fold_metrics: per fold, OOF metrics of its held-out cases at default thresholds
            (``dice_lesion_<R>``, ``dice_<R>``, ``hd95_lesion_<R>``, ``..._mean``).
        oof_metrics_default: pooled OOF metrics, default thresholds (0.5, no post-processing).
        oof_metrics_tuned: pooled OOF metrics with the tuned thresholds / post-processing.
        thresholds: tuned threshold per region channel.
        postprocess: tuned post-processing mapping (``min_size`` per region, ``fill_holes``).
        parent_run_id: the CV parent MLflow run.
    """

    ensemble_dir: Path
    ensemble: Ensemble
    fold_metrics: list[dict[str, float]]
    oof_metrics_default: dict[str, float]
    oof_metrics_tuned: dict[str, float]
    thresholds: dict[str, float]
    postprocess: dict[str, Any]
    parent_run_id: str
    out_dir: Path | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    fold_run_ids: list[str | None] = field(default_factory=list)
    folds: list[list[str]] = field(default_factory=list)
    metric: str = DEFAULT_METRIC
    registered: str | None = None  # "NAME/VERSION"
    promotion: Any = None  # bratstune.ensemble.registry.Promotion


def _threshold_spec(space: Any, challenge: str | None, trials: int) -> Any:
    from dataclasses import replace

    from bratstune.search.thresholds import ThresholdSpec, load_threshold_space, parse_threshold_space

    if isinstance(space, ThresholdSpec):
        spec = space
    elif space is not None:
        spec = load_threshold_space(space)
    else:
        spec = parse_threshold_space(DEFAULT_THRESHOLD_SPACE)
    if not challenge and (spec.metric.startswith("dice_lesion") or spec.metric.startswith("hd95_lesion")):
        logger.warning("no challenge known: tuning thresholds on legacy dice_mean instead of %s", spec.metric)
        spec = replace(spec, metric="dice_mean", mode="max")
    return replace(spec, num_samples=int(trials))


def _prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def _start_parent(client: Any, experiment_id: str, name: str, config: TrainConfig, *, k: int, seed: int,
                  prepared: Any, out_dir: Path, search_run_id: str | None, folds: list[list[str]],
                  resources: Mapping[str, float]) -> str:
    import yaml

    from bratstune.tracking.runs import log_config, run_tags

    extra = {"bratstune.kind": "crossval", "cv.name": name, "cv.output": str(out_dir)}
    if search_run_id:
        extra["search_run_id"] = search_run_id
    run_id = client.create_run(experiment_id, run_name=name,
                               tags=run_tags(data_fingerprint=prepared.fingerprint, extra=extra)).info.run_id
    for key, value in {"folds": k, "fold_seed": seed, "data.root": str(Path(prepared.root).absolute()),
                       "data.cases": len(prepared.cases), "data.fingerprint": prepared.fingerprint,
                       "search_run_id": search_run_id or "", "resources": json.dumps(dict(resources)),
                       "output": str(out_dir)}.items():
        client.log_param(run_id, f"cv.{key}", str(value))
    log_config(config, run_id=run_id)
    client.log_text(run_id, json.dumps({f"fold{i}": ids for i, ids in enumerate(folds)}, indent=1), "folds.json")
    client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "cv_config.yaml")
    return run_id


def cross_validate(
    config: TrainConfig | Mapping[str, Any],
    data_root: Path,
    *,
    k: int = 5,
    seed: int = 0,
    epochs: int | None = None,
    storage_path: str | Path | None = None,
    name: str | None = None,
    threshold_trials: int = 100,
    experiment_id: str | None = None,
    search_run_id: str | None = None,
    resources: Mapping[str, float] | None = None,
    smoke: bool = False,
    experiment: str = "bratstune-cv",
    tracking_uri: str | None = None,
    threshold_space: Any = None,
    inference: Any = None,
    register: str | None = None,
    promote: bool = False,
    force: bool = False,
    cache_root: str | Path | None = None,
    workers: int = 1,
    fit_fn: Callable[..., Any] | None = None,
    verbose: int = 1,
) -> CVOutcome:
    """k-fold CV of ``config`` on ``data_root`` -> tuned ensemble (see the module docstring).

    Ray must already be initialised (``ray.init``) by the caller; every fold writes into the
    output folder, which must therefore be visible to all nodes (local Ray, or a shared path).

    Args:
        config: the training config (e.g. a search's best config).
        data_root: labelled cohort folder.
        k: folds (``2 <= k <= cases``); seed: fold assignment seed.
        epochs: override ``config.epochs``.
        storage_path: parent folder of the output (default ``bratstune.paths.results_dir()/"cv"``);
            the output is ``storage_path/name`` (Tune's experiment folder too).
        name: default ``cv-<YYYYmmdd-HHMMSS>``.
        threshold_trials: Optuna trials of the threshold / post-processing search on the OOF cases.
        experiment_id: MLflow experiment (set up here, as ``experiment``, when ``None``).
        search_run_id: lineage: the search the config comes from.
        resources: per-fold Tune resources, default ``{"cpu": 1}`` (``num_threads`` follows ``cpu``).
        smoke: shrink the config to a seconds-long CPU run (:func:`smoke_config`).
        threshold_space: a ``kind: thresholds`` YAML / ``ThresholdSpec`` (default
            :data:`DEFAULT_THRESHOLD_SPACE`).
        inference: the ensemble's ``InferenceConfig`` (or mapping); default TTA flips, overlap 0.5.
        register, promote, force: register the ensemble as a new version of model ``register``
            (in the CV parent run) and move ``champion`` through the promotion gate on
            :data:`DEFAULT_METRIC` (``force`` moves it regardless).
        cache_root, workers: preprocessing cache and its processes.
        fit_fn: replaces ``train.fit`` inside the trials (tests, fault injection).
        verbose: Tune's console verbosity.

    Raises:
        ConfigError: label-mode config, bad ``k``; BratstuneError: a fold failed (parent run FAILED).
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    from bratstune.tracking import runs as tracking
    from bratstune.data.cache import CaseCache
    from bratstune.data.layout import discover
    from bratstune.search.tune import DataHandle
    from bratstune.search.callback import TrialRunCallback, find_trial_run
    from bratstune.data.cohort import prepare_cohort, preprocess_config

    plain = load_train_config(config).to_dict()
    if smoke:
        plain = smoke_config(plain)
    if epochs is not None:
        plain["epochs"] = int(epochs)
    train_config = load_train_config(plain)
    if train_config.loss.mode != "region":
        raise ConfigError("cross-validation tunes per-region thresholds on out-of-fold probabilities: it needs "
                          f"loss.mode: region (got {train_config.loss.mode!r})")
    resources = dict(resources or {"cpu": 1})
    resources.setdefault("cpu", 1)

    data_root = Path(data_root).resolve()
    cache = CaseCache(cache_root)
    preprocess = preprocess_config(dict(train_config.data.preprocess))
    prepared = prepare_cohort(data_root, preprocess, workers=workers, cache_root=cache.root)
    if len(prepared.cases) < max(k, 2):
        raise ConfigError(f"--folds {k}: the cohort has only {len(prepared.cases)} labelled case(s)")
    fold_idx = make_folds(prepared.cases, k, seed=seed)
    by_id = {c.case_id: c for c in discover(data_root).cases}
    fold_ids = [[prepared.cases[i].case_id for i in val] for val in fold_idx]
    handles = []
    for val in fold_idx:
        held = set(val)
        handles.append(DataHandle(
            root=data_root, cache_root=cache.root,
            train_cases=[by_id[c.case_id] for i, c in enumerate(prepared.cases) if i not in held],
            val_cases=[by_id[prepared.cases[i].case_id] for i in val],
            preprocess=preprocess, scheme=prepared.scheme, fingerprint=prepared.fingerprint,
        ))
    challenge = (train_config.challenge or prepared.challenge or None)
    challenge = challenge.upper() if challenge else None

    tracking_uri = tracking_uri or tracking.tracking_uri()
    if experiment_id is None:
        experiment_id = tracking.setup_mlflow(experiment, uri=tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name = name or f"cv-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(storage_path or paths.results_dir() / "cv").resolve()
    out_dir = storage / name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "folds.json").write_text(json.dumps({f"fold{i}": ids for i, ids in enumerate(fold_ids)}, indent=1))

    parent_run_id = _start_parent(client, experiment_id, name, train_config, k=k, seed=seed, prepared=prepared,
                                  out_dir=out_dir, search_run_id=search_run_id, folds=fold_ids, resources=resources)
    status = "FAILED"
    try:
        ctx = CVContext(name=name, base=train_config.to_dict(), metric=train_config.validation.metric,
                        folds=handles, out_dir=str(out_dir), tracking_uri=tracking_uri, experiment_id=experiment_id,
                        parent_run_id=parent_run_id, cpus=float(resources["cpu"]), fit_fn=fit_fn)
        trainable = tune.with_resources(tune.with_parameters(run_fold, ctx=ctx), resources)
        callback = TrialRunCallback(tracking_uri, experiment_id, parent_run_id, train_config.epochs, "fifo")
        tuner = tune.Tuner(
            trainable,
            param_space={FOLD_KEY: tune.grid_search(list(range(k)))},
            tune_config=tune.TuneConfig(num_samples=1, trial_name_creator=_fold_trial_name,
                                        trial_dirname_creator=_fold_trial_name),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), callbacks=[callback], verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
        start = time.perf_counter()
        grid = tuner.fit()
        train_s = time.perf_counter() - start
        fold_run_ids: list[str | None] = [None] * k
        failed = []
        for result in grid:
            fold = int(result.config[FOLD_KEY])
            trial_id = (result.metrics or {}).get("trial_id")
            if trial_id:
                fold_run_ids[fold] = find_trial_run(client, experiment_id, parent_run_id, str(trial_id))
            if result.error is not None:
                lines = str(result.error).strip().splitlines() or [""]
                failed.append(f"fold {fold}: {type(result.error).__name__}: {lines[-1]}")
        if failed:
            raise BratstuneError("cross-validation incomplete, " + "; ".join(failed))

        # -- pooled OOF: metrics, thresholds ------------------------------------------------------------
        from bratstune.search.thresholds import evaluate, search_thresholds, split_values

        scheme = prepared.scheme
        cached_by_fold = [load_oof(out_dir, [prepared.cases[i] for i in val]) for val in fold_idx]
        pooled = [c for fold in cached_by_fold for c in fold]
        lesion = bool(challenge)
        fold_metrics = [evaluate(cases, scheme, {}, challenge=challenge, lesion=lesion) for cases in cached_by_fold]
        oof_default = evaluate(pooled, scheme, {}, challenge=challenge, lesion=lesion)
        spec = _threshold_spec(threshold_space, challenge, threshold_trials)
        tuned_outcome = search_thresholds(spec, pooled, scheme, challenge=challenge, num_samples=threshold_trials)
        thresholds, post = split_values(tuned_outcome.best_values, scheme.train_regions)
        oof_tuned = dict(tuned_outcome.best_metrics)  # the best trial's metrics: no second pass

        for fold, metrics in enumerate(fold_metrics):
            client.log_batch(parent_run_id, metrics=_metric_list(_prefixed(f"fold{fold}/oof/", metrics)))
            if fold_run_ids[fold]:
                client.log_batch(fold_run_ids[fold], metrics=_metric_list(_prefixed("oof/", metrics)))
                client.set_tag(fold_run_ids[fold], "cv.fold", str(fold))
        client.log_batch(parent_run_id, metrics=_metric_list({
            **_prefixed("oof_default/", oof_default), **_prefixed("oof_tuned/", oof_tuned),
            **_prefixed("cv/", oof_tuned), "cv/train_s": train_s, "cv/threshold_trials": tuned_outcome.trials}))
        for key, value in tuned_outcome.best_values.items():
            client.log_param(parent_run_id, f"tuned.{key}", str(value))
        _write_thresholds(out_dir, thresholds, post, spec.metric, tuned_outcome)
        client.log_artifact(parent_run_id, str(out_dir / "thresholds.yaml"))
        from bratstune.search.results import write_csv

        client.log_text(parent_run_id, write_csv(tuned_outcome.table), "thresholds/results.csv")

        # -- the ensemble ------------------------------------------------------------------------------
        ensemble = _build_ensemble(out_dir, k, scheme, challenge, thresholds, post, oof_default, oof_tuned,
                                   fold_metrics, prepared, parent_run_id, search_run_id, inference)
        ensemble_dir = ensemble.save(out_dir / "ensemble")
        client.set_tag(parent_run_id, "ensemble.dir", str(ensemble_dir))
        client.set_tag(parent_run_id, "ensemble.digest", ensemble.digest or "")
        outcome = CVOutcome(
            ensemble_dir=ensemble_dir, ensemble=ensemble, fold_metrics=fold_metrics, oof_metrics_default=oof_default,
            oof_metrics_tuned=oof_tuned, thresholds=thresholds, postprocess=post, parent_run_id=parent_run_id,
            out_dir=out_dir, tracking_uri=tracking_uri, experiment_id=experiment_id, fold_run_ids=fold_run_ids,
            folds=fold_ids, metric=DEFAULT_METRIC if DEFAULT_METRIC in ensemble.metrics else "cv/dice_mean",
        )
        if register:
            _register(outcome, register, promote=promote, force=force)
        status = "FINISHED"
        logger.info("cross-validation %s: pooled OOF %s %.4f tuned (%.4f default); ensemble %s", name, spec.metric,
                    oof_tuned.get(spec.metric, float("nan")), oof_default.get(spec.metric, float("nan")), ensemble_dir)
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent_run_id, status=status)


def _fold_trial_name(trial: Any) -> str:
    """``fold<i>-<trial id>``: the Tune trial's (and its MLflow child run's) name."""
    return f"fold{trial.config[FOLD_KEY]}-{trial.trial_id}"


def _metric_list(metrics: Mapping[str, float]) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]


def _write_thresholds(out_dir: Path, thresholds: Mapping[str, float], post: Mapping[str, Any], metric: str,
                      outcome: Any) -> None:
    import yaml

    payload = {"thresholds": {k: float(v) for k, v in thresholds.items()},
               "postprocess": {"min_size": {k: int(v) for k, v in post.get("min_size", {}).items()},
                               "fill_holes": bool(post.get("fill_holes", False))},
               "metric": metric, "tuned": float(outcome.best_metric), "default": float(outcome.baseline_metric),
               "trials": int(outcome.trials)}
    (out_dir / "thresholds.yaml").write_text(yaml.safe_dump(payload, sort_keys=False))


def _build_ensemble(out_dir: Path, k: int, scheme: Any, challenge: str | None, thresholds: Mapping[str, float],
                    post: Mapping[str, Any], oof_default: Mapping[str, float], oof_tuned: Mapping[str, float],
                    fold_metrics: Sequence[Mapping[str, float]], prepared: Any, cv_run_id: str,
                    search_run_id: str | None, inference: Any) -> Ensemble:
    from bratstune.data.fingerprint import training_fingerprint
    from bratstune.ensemble.package import Ensemble, Member
    from bratstune.tracking.runs import git_commit

    members = [Member.from_folder(out_dir / FOLDS_DIR / f"fold{i}" / BEST_DIR, scheme, name=f"fold{i}")
               for i in range(k)]
    metrics = {**_prefixed("cv/", oof_tuned), **_prefixed("cv/default/", oof_default)}
    for i, fm in enumerate(fold_metrics):
        metrics.update(_prefixed(f"cv/fold{i}/", {m: v for m, v in fm.items() if m.endswith("_mean")}))
    if DEFAULT_METRIC not in metrics and "cv/dice_mean" in metrics:
        logger.warning("no lesion-wise metric (unknown challenge): %s is not recorded", DEFAULT_METRIC)
    lineage = {"cv_run_id": cv_run_id, "data_fingerprint": prepared.fingerprint,
               "data_root": str(Path(prepared.root).absolute()), "folds": str(k)}
    if search_run_id:
        lineage["search_run_id"] = search_run_id
    commit = git_commit().get("commit")
    if commit:
        lineage["git_commit"] = commit
    return Ensemble.from_members(
        members, scheme=scheme, challenge=challenge, inference=inference, thresholds=dict(thresholds),
        postprocess={"min_size": dict(post.get("min_size", {})), "fill_holes": bool(post.get("fill_holes", False))},
        training_fingerprint=training_fingerprint(c.fingerprint for c in prepared.cases), lineage=lineage,
        metrics=metrics,
    )


def _register(outcome: CVOutcome, name: str, *, promote: bool, force: bool) -> None:
    """Register the ensemble in the CV parent run and (optionally) promote it through the gate."""
    import mlflow

    from bratstune.ensemble import registry

    with mlflow.start_run(run_id=outcome.parent_run_id):
        version = str(registry.register_ensemble(outcome.ensemble, name=name, metric=outcome.metric,
                                                 tags={"cv_run_id": outcome.parent_run_id}).version)
        outcome.registered = f"{name}/{version}"
        mlflow.set_tags({"model.name": name, "model.version": version})
        if promote or force:
            decision = registry.promote(name, version, metric=outcome.metric, mode="max", force=force)
            outcome.promotion = decision
            mlflow.set_tags({"promotion.decision": "promoted" if decision.promoted else "rejected",
                             "promotion.reason": decision.reason[:5000]})
    # mlflow.start_run(run_id=...) ended the parent FINISHED on exit; the caller's finally keeps that status


def demo_cross_validate(cohort: str | Path, config: TrainConfig | Mapping[str, Any], *, folds: int = 3,
                        epochs: int = 3, steps: int = 20, register: str | None = "bratstune-gli",
                        storage_path: str | Path | None = None, threshold_trials: int = 20,
                        search_run_id: str | None = None, verbose: int = 0) -> CVOutcome:
    """The ``make demo`` cross-validation after the loss search: ``folds`` small CPU folds of ``config``.

    Ray must be initialised by the caller (``ray.init(runtime_env=...)``, see ``jobs/_bootstrap``);
    ``config`` is typically ``demo_search(...).best_config``. Registers and promotes the ensemble
    as ``register`` (skipped when ``None``).
    """
    plain = load_train_config(config).to_dict()
    plain["steps_per_epoch"] = int(steps)
    plain["data"] = {**plain["data"], "num_workers": 0}
    plain["validation"] = {**plain["validation"], "every_n_epochs": max(1, int(epochs))}  # validate at the end only
    plain["device"] = "cpu"
    return cross_validate(plain, Path(cohort), k=folds, epochs=epochs, storage_path=storage_path,
                          threshold_trials=threshold_trials, register=register, promote=register is not None,
                          search_run_id=search_run_id, verbose=verbose)
