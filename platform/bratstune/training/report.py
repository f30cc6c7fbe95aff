"""What :func:`bratstune.training.fit.fit` reports after each epoch and returns at the end.

A reporter is any callable taking an :class:`EpochReport` (Ray Tune's trial reporter and
MLflow's epoch logger live in the search layer, :mod:`bratstune.search.reporter`): training
itself knows nothing of either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bratstune.errors import BratstuneError
from bratstune.training.config import TrainConfig

__all__ = ["EpochReport", "FitResult", "Reporter", "TrainingDiverged"]


Reporter = Callable[["EpochReport"], None]


class TrainingDiverged(BratstuneError):
    """The loss became NaN or infinite (lower ``optim.lr`` or enable ``optim.grad_clip``)."""


@dataclass(frozen=True)
class EpochReport:
    """What ``reporter`` receives after each epoch.

    Attributes:
        epoch: epochs completed (1-based).
        metrics: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``time/data_wait_s``,
            ``time/compute_s`` (means per step), ``time/epoch_s``, ``epoch``, and the
            validation metrics (``val/dice_WT`` ..., ``val/dice_mean``, lesion-wise ones).
            Between validations the last validation values are repeated (``val/epoch`` says
            which epoch they come from) so a scheduler always finds its metric.
        checkpoint_dir: the resumable checkpoint folder written after this epoch, or ``None``.
        is_best: this epoch's validation improved the selection metric.
        validated: validation ran after this epoch (the ``val/`` values are fresh).
        best_dir: the best-model folder (``model.pt`` + config + metrics), once one exists.
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint_dir: Path | None
    is_best: bool
    validated: bool = False
    best_dir: Path | None = None


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        config: the resolved config (model kwargs completed with the patch size).
        model: the network holding the best weights (the last ones if never validated), on CPU.
        best_metric: best value of ``config.validation.metric`` (``None`` without validation).
        best_epoch: epoch of the best value.
        best_metrics: all metrics of the best epoch (the last epoch's without validation).
        history: one metrics dict per epoch of this run (including resumed ones from the checkpoint).
        out_dir: the output folder.
        best_dir: the best-model folder, or ``None``.
        last_checkpoint: the last resumable checkpoint folder, or ``None``.
        epochs_completed: epochs done in total.
    """

    config: TrainConfig
    model: torch.nn.Module
    best_metric: float | None
    best_epoch: int | None
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    out_dir: Path
    best_dir: Path | None
    last_checkpoint: Path | None
    epochs_completed: int
