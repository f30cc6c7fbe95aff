"""Stage 2, fold trials: one Ray Tune trial per fold, each a search trial on its fold's split.

A ``Tuner`` over ``tune.grid_search(range(k))`` of the meta parameter ``_fold`` (FIFO, per-trial
resources). Each trial *is* a search trial: :func:`bratstune.search.trial.run_trial` with that
fold's :class:`~bratstune.search.data.DataHandle` (its training cases and, with ``selection:
inner``, the inner validation cases that choose its epoch; never its held-out cases), so a fold
gets the same MLflow child run (params, per-epoch metrics, ``best_model`` artifact,
``stop_reason``) under the CV parent run, checkpoints/retries and the driver-side
:class:`bratstune.search.callback.TrialRunCallback`. Its ``fit_fn`` wraps ``fit`` to keep the
fold's model (``<out>/folds/foldI/best_model``: the selected epoch, or the last one with
``selection: fixed``) and to write the out-of-fold probabilities of its held-out cases
(:func:`~bratstune.search.crossval.oof.write_oof`, from a separate handle) before the trial ends.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from bratstune.errors import BratstuneError, DataError
from bratstune.search.callback import TrialRunCallback, find_trial_run, replay_outage
from bratstune.search.crossval.oof import write_oof
from bratstune.search.data import DataHandle
from bratstune.search.trial import TrialContext, outage_spool, run_trial
from bratstune.training.checkpoint import save_best
from bratstune.training.fit import fit
from bratstune.training.report import FitResult

logger = logging.getLogger(__name__)

__all__ = ["BEST_DIR", "FOLDS_DIR", "FOLD_KEY", "CVContext", "FoldRuns", "run_fold", "train_folds"]

#: The Tune parameter holding the fold index (``_`` prefix: a meta parameter, not a config key).
FOLD_KEY = "_fold"
FOLDS_DIR = "folds"
BEST_DIR = "best_model"


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
    held_out: list[DataHandle] | None = None
    selection: str = "inner"
    spool_dir: str | None = None


def _keep_best(result: FitResult, fold_dir: Path, fold: int, selection: str) -> Path:
    """The fold's model at ``<fold_dir>/best_model`` (atomically replaced).

    ``selection: inner``: fit's best-model folder (the epoch its inner validation chose);
    ``fixed``: the last weights (fit ran without validation cases).
    """
    best = fold_dir / BEST_DIR
    tmp = fold_dir / f".{BEST_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if result.best_dir is not None:
        shutil.copytree(result.best_dir, tmp)
    elif selection == "fixed":
        save_best(tmp, model=result.model, config=result.config.to_dict(), metrics=result.best_metrics)
    else:
        raise DataError(fold_dir, f"fold {fold} produced no best checkpoint (no inner validation cases?)")
    shutil.rmtree(best, ignore_errors=True)
    os.replace(tmp, best)
    return best


def _check_held_out(data: Any, held_out: Any, fold: int) -> None:
    """Refuse to train when a held-out case reached the fold's training or selection cases."""
    seen = {c.case_id for c in list(data.train) + list(data.val)}
    leaked = sorted(seen & {c.case_id for c in held_out})
    if leaked:
        raise DataError(None, f"fold {fold}: held-out case(s) {leaked[:5]} are among its training/selection cases")


def _fit_and_keep(
    config: Any,
    data: Any,
    reporter: Any = None,
    *,
    fold: int,
    cv_dir: str,
    held_out: DataHandle,
    selection: str = "inner",
    fit_fn: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> FitResult:
    """``fit`` + keep the fold's model + write its OOF probabilities (in the trial).

    ``data`` holds the fold's training and (inner) selection cases; ``held_out`` its held-out ones.
    """
    held = held_out.load().val
    _check_held_out(data, held, fold)
    result = (fit_fn or fit)(config, data, reporter, **kwargs)
    fold_dir = Path(cv_dir) / FOLDS_DIR / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    best = _keep_best(result, fold_dir, fold, selection)
    cases = write_oof(result, held, cv_dir, fold_dir)
    logger.info("fold %d: best model -> %s, OOF probabilities of %d case(s)", fold, best, cases)
    return result


def run_fold(config: dict[str, Any], ctx: CVContext) -> None:
    """Ray Tune function trainable of one fold: :func:`bratstune.search.trial.run_trial` on its split."""
    fold = int(config[FOLD_KEY])
    if ctx.held_out is None:
        raise DataError(None, "CVContext.held_out: the folds' held-out cases are missing")
    keep = functools.partial(
        _fit_and_keep,
        fold=fold,
        cv_dir=ctx.out_dir,
        held_out=ctx.held_out[fold],
        selection=ctx.selection,
        fit_fn=ctx.fit_fn,
    )
    trial_ctx = TrialContext(
        search_name=ctx.name,
        base=ctx.base,
        metric=ctx.metric,
        data=ctx.folds[fold],
        tracking_uri=ctx.tracking_uri,
        experiment_id=ctx.experiment_id,
        parent_run_id=ctx.parent_run_id,
        cpus=ctx.cpus,
        fit_fn=keep,
        spool_dir=ctx.spool_dir,
    )
    run_trial(config, trial_ctx)


def _fold_trial_name(trial: Any) -> str:
    """``fold<i>-<trial id>``: the Tune trial's (and its MLflow child run's) name."""
    return f"fold{trial.config[FOLD_KEY]}-{trial.trial_id}"


@dataclass
class FoldRuns:
    """What the fold trials leave for the driver: each fold's MLflow child run, the training time."""

    run_ids: list[str | None]
    seconds: float


def _fold_runs(grid: Any, ctx: CVContext, seconds: float) -> FoldRuns:
    """Each fold's child run; raises when a fold failed."""
    client = MlflowClient(ctx.tracking_uri)
    run_ids: list[str | None] = [None] * len(ctx.folds)
    failed = []
    for result in grid:
        fold = int(result.config[FOLD_KEY])
        trial_id = (result.metrics or {}).get("trial_id")
        if trial_id:
            run_ids[fold] = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, str(trial_id))
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or [""]
            failed.append(f"fold {fold}: {type(result.error).__name__}: {lines[-1]}")
    if failed:
        raise BratstuneError("cross-validation incomplete, " + "; ".join(failed))
    return FoldRuns(run_ids, seconds)


def train_folds(
    ctx: CVContext, *, resources: Mapping[str, float], epochs: int, storage: Path, verbose: int = 1
) -> FoldRuns:
    """Train every fold as a Tune trial (Ray must be initialised); returns their child runs.

    Raises:
        BratstuneError: a fold failed (after its retry).
    """
    ctx = replace(ctx, spool_dir=outage_spool(storage, ctx.name))
    trainable = tune.with_resources(tune.with_parameters(run_fold, ctx=ctx), dict(resources))
    callback = TrialRunCallback(
        ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, epochs, "fifo", spool_dir=ctx.spool_dir
    )
    tuner = tune.Tuner(
        trainable,
        param_space={FOLD_KEY: tune.grid_search(list(range(len(ctx.folds))))},
        tune_config=tune.TuneConfig(
            num_samples=1, trial_name_creator=_fold_trial_name, trial_dirname_creator=_fold_trial_name
        ),
        run_config=tune.RunConfig(
            name=ctx.name,
            storage_path=str(storage),
            callbacks=[callback],
            verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=1),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    replay_outage(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.spool_dir)
    return _fold_runs(grid, ctx, time.perf_counter() - start)
