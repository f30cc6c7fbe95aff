"""The one training loop every job calls: ``fit(config, data, reporter) -> FitResult``.

One run = patch-based training with tumour-focused sampling for ``epochs x steps_per_epoch``
optimisation steps, sliding-window validation on whole volumes, best-checkpoint keeping and
a per-epoch :class:`EpochReport` to ``reporter`` (Ray Tune, MLflow, a test ...)::

    result = fit(config, TrainData(train=cases[:20], val=cases[20:], scheme=scheme),
                 reporter=print, out_dir=Path("run"))
    result.best_metrics["val/dice_mean"]

Pieces (each in its own module): :mod:`bratstune.training.config` (the typed config),
:mod:`bratstune.training.network` (network from the config, init weights, frozen groups),
:mod:`bratstune.training.loader` (background patch loading), :mod:`bratstune.training.schedules` (optimiser +
lr schedule), :mod:`bratstune.training.checkpoint` (resumable state, RNGs),
:mod:`bratstune.training.validate` (sliding window + metrics), :mod:`bratstune.device` (device, AMP
dtype, threads); :mod:`bratstune.data.cohort` turns a cohort folder into :class:`TrainData`.

Output folder (``out_dir``)::

    checkpoints/epoch_0007/   state.pt + config.yaml + metrics.json + best/ (resumable on its own;
                              only the latest is kept)
    best/                     model.pt + config.yaml + metrics.json (best by validation.metric)

Epochs are counted from 1 in reports and logs; a checkpoint written after epoch ``e`` resumes
at epoch ``e + 1`` with the same model, optimiser, scheduler, scaler and RNG states, and the
data stream continues exactly where it stopped (patch ``i`` of epoch ``e`` depends only on
``(seed, e, i)``).
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bratstune.data.cohort import TrainData
from bratstune.device import (
    amp_dtype,
    configure_threads,
    default_num_workers,
    needs_grad_scaler,
    select_device,
)
from bratstune.errors import DataError
from bratstune.inference.decode import DecodeSettings
from bratstune.inference.outputs import output_heads
from bratstune.inference.sliding_window import InferenceConfig
from bratstune.models import QUERY_ARCHITECTURES, set_train_mode
from bratstune.models.network import load_model_weights
from bratstune.training.checkpoint import (
    TrainState,
    load_state,
    restore_best,
    save_best,
    save_state,
)
from bratstune.training.config import TrainConfig, load_train_config
from bratstune.training.label_dust import apply_label_dust
from bratstune.training.loader import build_train_loader
from bratstune.training.losses import CompoundLoss, deep_supervision_loss
from bratstune.training.mask_loss import HungarianMaskLoss
from bratstune.training.network import build_network, load_network, output_channels, prepare_network, resolve_config
from bratstune.training.report import EpochReport, FitResult, Reporter, TrainingDiverged
from bratstune.training.schedules import build_optimizer, build_scheduler
from bratstune.training.validate import validate

logger = logging.getLogger(__name__)

__all__ = [
    "build_network",
    "compute_loss",
    "fit",
    "inference_settings",
    "load_network",
    "output_channels",
    "resolve_config",
    "seed_everything",
]

# -- set-up helpers ------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build_loss(config: TrainConfig) -> torch.nn.Module:
    if config.model.name in QUERY_ARCHITECTURES:  # query masks: Hungarian-matched loss
        return HungarianMaskLoss.from_config(config.loss)
    return CompoundLoss(
        dict(config.loss.weights),
        mode=config.loss.mode,
        alpha=config.loss.alpha,
        beta=config.loss.beta,
        gamma=config.loss.gamma,
        focal_gamma=config.loss.focal_gamma,
    )


def _check_data(data: TrainData) -> None:
    if not data.train:
        raise DataError(None, "no training cases: TrainData.train is empty")
    for case in list(data.train) + list(data.val):
        if case.label is None:
            raise DataError(None, f"case {case.case_id} has no label; training and validation need labels")


# -- the loss on (possibly deep-supervised) outputs ----------------------------------------------


def compute_loss(
    loss_fn: torch.nn.Module, output: Any, target: torch.Tensor, *, deep_supervision: bool
) -> torch.Tensor:
    """Loss of the main output, or the deep-supervision weighted sum over the heads.

    Deep-supervision outputs (DynUNet's ``(B, S, C, ...)`` or a list of heads) go through
    ``bratstune.training.losses.deep_supervision_loss`` (weights 1, 1/2, 1/4, ... normalised); with
    ``deep_supervision=False`` only the full-resolution head is used. A query set (``transunet_dec``)
    goes to its :class:`~bratstune.training.mask_loss.HungarianMaskLoss` as a whole.
    """
    if isinstance(loss_fn, HungarianMaskLoss):
        return loss_fn(output, target, deep_supervision=deep_supervision)
    heads = output_heads(output)
    if len(heads) == 1 or not deep_supervision:
        return loss_fn(heads[0].float(), target)
    return deep_supervision_loss(loss_fn, [h.float() for h in heads], target)


# -- one run -------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one :func:`fit` call works with (built by :func:`_setup`)."""

    config: TrainConfig
    data: TrainData
    out: Path
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    settings: InferenceConfig
    state: TrainState
    params: list[torch.nn.Parameter] = field(default_factory=list)
    best_dir: Path | None = None
    last_checkpoint: Path | None = None
    last_val: dict[str, float] = field(default_factory=dict)

    @property
    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()


def inference_settings(
    config: TrainConfig, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> InferenceConfig:
    """Sliding-window settings of ``config``'s validation (window defaults to the patch size)."""
    v = config.validation
    return InferenceConfig(
        roi_size=tuple(v.roi_size or config.data.patch_size),  # type: ignore[arg-type]
        overlap=v.overlap,
        sw_batch_size=v.sw_batch_size,
        blend=v.blend,
        mode=config.loss.mode,
        device=device if device is not None else torch.device("cpu"),
        amp_dtype=dtype,
    )


def _setup(config: TrainConfig, data: TrainData, out: Path, resume_from: Path | None) -> _Run:
    """Device, seeds, network, optimiser, schedule, scaler; restored from ``resume_from`` if given."""
    configure_threads(config.num_threads)
    device = select_device(config.device)
    dtype = amp_dtype(device, config.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(config.seed)
    in_channels = int(np.asarray(data.train[0].image).shape[0])
    model = prepare_network(config, data.scheme, in_channels=in_channels).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optim)
    scheduler = build_scheduler(
        optimizer, config.optim, total_steps=config.total_steps, steps_per_epoch=config.steps_per_epoch
    )
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, dtype))
    run = _Run(
        config=config,
        data=data,
        out=out,
        model=model,
        loss_fn=_build_loss(config).to(device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        device=device,
        dtype=dtype,
        settings=inference_settings(config, device, dtype),
        state=TrainState(),
        params=params,
    )
    if resume_from is not None:
        run.state = load_state(
            resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, map_location=device
        )
        run.best_dir = restore_best(resume_from, out / "best")
        run.last_checkpoint = Path(resume_from)
        run.last_val = _last_validation(run.state.history)
        logger.info("resumed from %s after epoch %d (best %s)", resume_from, run.state.epoch, run.state.best_metric)
    return run


def _last_validation(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    for row in reversed(history):
        if "val/epoch" in row:
            return {k: v for k, v in row.items() if k.startswith("val/")}
    return {}


def _step(run: _Run, batch: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """One optimisation step; returns ``(loss, grad_norm)``."""
    image = batch["image"].to(run.device, non_blocking=True)
    target = batch["target"].to(run.device, non_blocking=True)
    if target.dtype == torch.bool:
        target = target.float()
    run.optimizer.zero_grad(set_to_none=True)
    if run.dtype is not None:
        with torch.autocast(run.device.type, dtype=run.dtype):
            output = run.model(image)
    else:
        output = run.model(image)
    loss = compute_loss(run.loss_fn, output, target, deep_supervision=run.config.loss.deep_supervision)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    clip = run.config.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm=clip if clip else float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return float(loss.detach()), float(grad_norm)


def _train_epoch(run: _Run, batches: Iterator[Mapping[str, torch.Tensor]], epoch: int) -> dict[str, float]:
    """``steps_per_epoch`` steps; returns mean loss, lr, grad norm and the time split per step.

    ``time/data_wait_s`` is the time blocked on the loader, ``time/compute_s`` the forward,
    backward and optimiser step (synchronised on CUDA).
    """

    set_train_mode(run.model, True)
    losses, norms, waits, computes = [], [], [], []
    start = time.perf_counter()
    for step in range(run.config.steps_per_epoch):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        loss, norm = _step(run, batch)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        t2 = time.perf_counter()
        if not math.isfinite(loss) and not run.scaler.is_enabled():
            raise TrainingDiverged(
                f"loss is {loss} at epoch {epoch}, step {step + 1} (lr {run.optimizer.param_groups[0]['lr']:.3g}); "
                "lower optim.lr or set optim.grad_clip"
            )
        losses.append(loss)
        norms.append(norm)
        waits.append(t1 - t0)
        computes.append(t2 - t1)
    finite = [v for v in losses if math.isfinite(v)]
    return {
        "train/loss": float(np.mean(finite)) if finite else float("nan"),
        "train/lr": float(run.optimizer.param_groups[0]["lr"]),
        "train/grad_norm": float(np.nanmean(norms)),
        "time/data_wait_s": float(np.mean(waits)),
        "time/compute_s": float(np.mean(computes)),
        "time/epoch_s": time.perf_counter() - start,
    }


def _validate_epoch(run: _Run) -> dict[str, float]:
    v = run.config.validation
    cases = list(run.data.val)[: v.max_cases] if v.max_cases else list(run.data.val)
    start = time.perf_counter()
    metrics = validate(
        run.model,
        cases,
        run.data.scheme,
        run.settings,
        challenge=run.config.challenge or "GLI",
        lesion_metrics=v.lesion_metrics,
        protocol=v.protocol,
        decode=DecodeSettings(postprocess=v.postprocess) if v.postprocess else None,
    )
    if v.metric not in metrics:
        logger.warning("validation.metric %r is not among the validation metrics %s", v.metric, sorted(metrics))
    return {**metrics, "time/val_s": time.perf_counter() - start}


def _is_better(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _end_epoch(run: _Run, epoch: int, metrics: dict[str, float], validated: bool) -> EpochReport:
    """Record the epoch: best model, resumable checkpoint, history; return the report."""
    config, state = run.config, run.state
    metrics.update(run.last_val)
    is_best = validated and _is_better(
        metrics.get(config.validation.metric), state.best_metric, config.validation.metric_mode
    )
    state.epoch = epoch
    state.global_step = epoch * config.steps_per_epoch
    state.history.append({k: v for k, v in metrics.items() if validated or not k.startswith("val/")})
    if is_best:
        state.best_metric = float(metrics[config.validation.metric])
        state.best_epoch = epoch
        run.best_dir = save_best(run.out / "best", model=run.model, config=run.config_dict, metrics=metrics)
    checkpoint = None
    if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
        checkpoint = save_state(
            run.out / "checkpoints" / f"epoch_{epoch:04d}",
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            scaler=run.scaler,
            state=state,
            config=run.config_dict,
            metrics=metrics,
            best_dir=run.best_dir,
        )
        _drop_older_checkpoints(run.out / "checkpoints", keep=checkpoint)
        run.last_checkpoint = checkpoint
    return EpochReport(epoch, dict(metrics), checkpoint, is_best, validated, run.best_dir)


def _log_epoch(epoch: int, config: TrainConfig, metrics: Mapping[str, float], scheme: Any, validated: bool) -> None:
    text = (
        f"epoch {epoch}/{config.epochs}: loss {metrics['train/loss']:.4f}, lr {metrics['train/lr']:.3g}, "
        f"{metrics['time/epoch_s']:.1f} s/epoch (data wait {metrics['time/data_wait_s'] * 1e3:.1f} ms/step, "
        f"compute {metrics['time/compute_s']:.3f} s/step)"
    )
    if validated:
        dice = ", ".join(f"{r} {metrics[f'val/dice_{r}']:.3f}" for r in scheme.regions if f"val/dice_{r}" in metrics)
        text += (
            f"; val Dice {dice}, mean {metrics.get('val/dice_mean', float('nan')):.3f} ({metrics['time/val_s']:.1f} s)"
        )
    logger.info(text)


def _drop_older_checkpoints(folder: Path, *, keep: Path) -> None:
    for path in folder.glob("epoch_*"):
        if path != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# -- fit -----------------------------------------------------------------------------------------


def fit(
    config: TrainConfig | Mapping[str, Any],
    data: TrainData,
    reporter: Reporter | None = None,
    *,
    out_dir: Path | str | None = None,
    resume_from: Path | str | None = None,
) -> FitResult:
    """Train one model (see the module docstring).

    Args:
        config: a :class:`TrainConfig` or a mapping of the same shape (validated).
        data: training and validation cases and the label scheme.
        reporter: called with an :class:`EpochReport` after every epoch (exceptions propagate,
            so a scheduler may stop the run by raising).
        out_dir: output folder for checkpoints and the best model; default a new temporary folder.
        resume_from: a checkpoint folder (or its ``state.pt``) written by an earlier run of the
            same config: training continues at the next epoch with all states restored.

    Returns:
        :class:`FitResult`.

    Raises:
        ConfigError: bad configuration (unknown architecture, loss term, device ...).
        DataError: no training cases, a case without a label, a missing checkpoint.
        TrainingDiverged: the loss became NaN/inf.
    """
    config = resolve_config(load_train_config(config))
    _check_data(data)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="bratstune-fit-"))
    out.mkdir(parents=True, exist_ok=True)
    run = _setup(config, data, out, Path(resume_from) if resume_from is not None else None)
    workers = config.data.num_workers if config.data.num_workers is not None else default_num_workers()
    logger.info(
        "training %s (%d parameters, %d trainable) on %s, amp %s, %d train / %d val cases, %d loader workers",
        config.model.name,
        sum(p.numel() for p in run.model.parameters()),
        sum(p.numel() for p in run.params),
        run.device,
        run.dtype,
        len(data.train),
        len(data.val),
        workers,
    )
    loader = build_train_loader(
        config,
        apply_label_dust(config, data.train, data.scheme),  # validation keeps the original labels
        data.scheme,
        start_epoch=run.state.epoch,
        num_workers=workers,
        pin_memory=run.device.type == "cuda",
    )
    batches = iter(loader)
    try:
        for epoch in range(run.state.epoch + 1, config.epochs + 1):
            metrics = {"epoch": float(epoch), **_train_epoch(run, batches, epoch)}
            validated = bool(data.val) and (epoch % config.validation.every_n_epochs == 0 or epoch == config.epochs)
            if validated:
                val = _validate_epoch(run)
                metrics["time/val_s"] = val.pop("time/val_s")
                run.last_val = {**val, "val/epoch": float(epoch)}
            report = _end_epoch(run, epoch, metrics, validated)
            _log_epoch(epoch, config, report.metrics, data.scheme, validated)
            if reporter is not None:
                reporter(report)
    finally:
        del batches  # stops the DataLoader workers
    return _finish(run)


def _finish(run: _Run) -> FitResult:
    state = run.state
    if run.best_dir is not None:
        load_model_weights(run.model, run.best_dir, map_location=run.device)
        logger.info("best %s = %.4f at epoch %s", run.config.validation.metric, state.best_metric, state.best_epoch)
    best_row = next((row for row in state.history if row.get("epoch") == state.best_epoch), None)
    best_metrics = dict(best_row) if best_row is not None else dict(state.history[-1] if state.history else {})
    return FitResult(
        config=run.config,
        model=run.model.cpu().eval(),
        best_metric=state.best_metric,
        best_epoch=state.best_epoch,
        best_metrics=best_metrics,
        history=list(state.history),
        out_dir=run.out,
        best_dir=run.best_dir,
        last_checkpoint=run.last_checkpoint,
        epochs_completed=state.epoch,
    )
