"""Optimisers and per-step learning-rate schedules built from :class:`OptimConfig`.

Schedules are composed from ``torch.optim.lr_scheduler`` and stepped once per optimisation
step over ``total_steps = epochs * steps_per_epoch``:

* warm-up (``warmup_fraction > 0``): ``LinearLR`` from ``1/W`` to 1 over ``W`` steps, then
  the main schedule via ``SequentialLR``;
* ``cosine``: ``CosineAnnealingLR`` to ``min_lr_fraction * lr`` over the remaining steps;
* ``poly``: ``PolynomialLR`` (:math:`lr (1 - t/T)^{power}`);
* ``exponential``: ``ExponentialLR`` with the per-epoch ``decay`` spread over the epoch's steps
  (:math:`\\gamma_{step} = decay^{1/steps\\_per\\_epoch}`);
* ``constant``: ``ConstantLR`` with factor 1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch.optim import lr_scheduler

from bratstune.training.config import OptimConfig

logger = logging.getLogger(__name__)

__all__ = ["build_optimizer", "build_scheduler", "warmup_steps"]


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov momentum) over ``params`` with ``config``'s lr and decay."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: every parameter is frozen (check `freeze`)")
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    """Number of linear warm-up steps (0 when disabled; always leaves >= 1 main step)."""
    steps = int(round(config.warmup_fraction * total_steps))
    return max(0, min(steps, total_steps - 1))


def _main_schedule(
    optimizer: torch.optim.Optimizer, config: OptimConfig, steps: int, steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    steps = max(1, steps)
    if config.schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=config.lr * config.min_lr_fraction)
    if config.schedule == "poly":
        return lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=config.power)
    if config.schedule == "exponential":
        return lr_scheduler.ExponentialLR(optimizer, gamma=config.decay ** (1.0 / max(1, steps_per_epoch)))
    return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, *, total_steps: int, steps_per_epoch: int
) -> lr_scheduler.LRScheduler:
    """The per-step schedule of the run (see the module docstring)."""
    warm = warmup_steps(config, total_steps)
    if warm == 0:
        return _main_schedule(optimizer, config, total_steps, steps_per_epoch)
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    main = _main_schedule(optimizer, config, total_steps - warm, steps_per_epoch)
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warmup, main], milestones=[warm])
