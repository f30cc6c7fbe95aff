"""Typed configuration of one training run (:func:`bratstune.training.fit.fit`).

The YAML shape (shared with the presets in ``bratstune/presets/*.yaml``)::

    model: {name: unet, kwargs: {filters: [16, 32, 64, 128]}}
    loss: {weights: {dice: 1.0, ce: 1.0}, mode: region, alpha: 0.3, beta: 0.7, gamma: 2.0}
    optim: {name: adam, lr: 1.0e-3, weight_decay: 0.0, schedule: cosine, warmup_fraction: 0.02,
            grad_clip: 12.0}
    data: {patch_size: [48, 48, 48], batch_size: 2, fg_prob: 0.7}
    validation: {every_n_epochs: 1, overlap: 0.25, metric: val/dice_mean, metric_mode: max}
    init: {encoder_from: null}
    freeze: []
    epochs: 30
    steps_per_epoch: 50
    seed: 0
    num_threads: null
    amp: auto
    device: auto
    challenge: null

Every section and key is optional (defaults below). Load with :func:`load_train_config`,
which validates keys with nearest-key suggestions (``bratstune.config_utils.from_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bratstune.config_utils import check_choice, from_dict, suggest, to_dict, to_triple
from bratstune.errors import ConfigError

__all__ = [
    "AMP_MODES",
    "LOSS_TERMS",
    "DEVICES",
    "LOSS_MODES",
    "OPTIMIZERS",
    "SCHEDULES",
    "DataConfig",
    "InitConfig",
    "LabelDustConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationConfig",
    "load_train_config",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "poly", "exponential", "constant")
LOSS_MODES = ("region", "label")
AMP_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
METRIC_MODES = ("max", "min")
BLEND_MODES = ("gaussian", "constant")
PROTOCOLS = ("brats2023", "brats2026")


def _positive(value: float, what: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{what}: expected a number {bound}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: ``bratstune.models.build_model(name, in_channels, out_channels, **kwargs)``."""

    name: str = "unet"
    kwargs: dict[str, Any] = field(default_factory=dict)


#: The loss terms :class:`bratstune.training.losses.CompoundLoss` knows (formulas there).
LOSS_TERMS: tuple[str, ...] = ("dice", "focal", "focal_tversky", "ce", "mse", "edge")


def check_number(value: Any, what: str, *, minimum: float | None = None, strict: bool = False) -> float:
    """``float(value)``, finite, ``>= minimum`` (``> minimum`` when ``strict``); else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        raise ConfigError(f"{what} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return value


@dataclass(frozen=True)
class LossConfig:
    """``bratstune.training.losses.CompoundLoss(weights, mode=mode, alpha=, beta=, gamma=)``.

    The one place where loss term names, weights and Tversky parameters are validated: the loss
    itself, the training config and the search spaces all call the checks below.

    Args:
        weights: term name -> weight ``>= 0`` (at least one positive), e.g. ``{dice: 1.0, ce: 1.0}``;
            names from :data:`LOSS_TERMS`.
        mode: ``region`` (sigmoid per nested region WT/TC/ET, the default) or ``label``
            (softmax over background + the scheme's labels).
        alpha, beta: Tversky weights of false positives / false negatives (``alpha + beta > 0``).
        gamma: Focal-Tversky exponent (``> 0``).
        focal_gamma: focusing exponent of the ``focal`` term (``>= 0``).
        deep_supervision: weight lower-resolution heads when the model returns several outputs
            in training mode (weights ``1/2**i``, normalised).
    """

    weights: dict[str, float] = field(default_factory=lambda: {"dice": 1.0, "ce": 1.0})
    mode: str = "region"
    alpha: float = 0.3
    beta: float = 0.7
    gamma: float = 2.0
    focal_gamma: float = 2.0
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        check_choice(self.mode, LOSS_MODES, "loss.mode")
        object.__setattr__(self, "weights", self.check_weights(self.weights))
        self.check_tversky(self.alpha, self.beta, self.gamma)
        check_number(self.focal_gamma, "loss.focal_gamma", minimum=0.0)

    @staticmethod
    def check_term(name: str, where: str = "loss.weights") -> None:
        """Raise ConfigError (with the nearest valid name) unless ``name`` is a loss term."""
        if name not in LOSS_TERMS:
            raise ConfigError(
                f"{where}: unknown loss term '{name}'{suggest(name, LOSS_TERMS)}; expected one of {list(LOSS_TERMS)}"
            )

    @classmethod
    def check_weights(cls, weights: Any) -> dict[str, float]:
        """Term name -> weight as floats (zeros kept); at least one weight must be positive."""
        if not isinstance(weights, Mapping):
            raise ConfigError(
                f"loss.weights must be a mapping term -> weight, e.g. {{dice: 1.0, ce: 1.0}}; got {weights!r}"
            )
        out: dict[str, float] = {}
        for name, value in weights.items():
            cls.check_term(str(name))
            out[str(name)] = check_number(value, f"loss.weights.{name}", minimum=0.0)
        if not any(v > 0 for v in out.values()):
            raise ConfigError(
                f"loss.weights: all loss weights are zero ({dict(weights)}); give at least one term a positive weight"
            )
        return out

    @staticmethod
    def check_tversky(alpha: Any, beta: Any, gamma: Any) -> tuple[float, float, float]:
        """Validated Tversky ``(alpha, beta, gamma)``."""
        alpha = check_number(alpha, "loss.alpha (Tversky false-positive weight)", minimum=0.0)
        beta = check_number(beta, "loss.beta (Tversky false-negative weight)", minimum=0.0)
        if alpha + beta <= 0:
            raise ConfigError(
                f"loss: alpha + beta must be > 0 (got alpha={alpha!r}, beta={beta!r}); the usual choice is 0.3, 0.7"
            )
        gamma = check_number(gamma, "loss.gamma (focal-Tversky exponent)", minimum=0.0, strict=True)
        return alpha, beta, gamma


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, learning-rate schedule and gradient clipping.

    Args:
        name: ``adam``, ``adamw`` or ``sgd`` (momentum, Nesterov).
        lr: peak learning rate (reached at the end of the warm-up).
        weight_decay: L2 (adam/sgd) or decoupled (adamw) weight decay.
        momentum, nesterov: SGD only.
        schedule: ``cosine`` (to ``min_lr_fraction * lr``), ``poly``
            (:math:`lr (1 - t/T)^{power}`), ``exponential`` (times ``decay`` per epoch) or
            ``constant``; stepped once per optimisation step.
        warmup_fraction: fraction of all steps with a linear warm-up from ``lr / warmup_steps``.
        power: exponent of the ``poly`` schedule.
        decay: per-epoch factor of the ``exponential`` schedule.
        min_lr_fraction: floor of the ``cosine`` schedule, as a fraction of ``lr``.
        grad_clip: maximum global gradient norm; ``null`` or ``0`` disables clipping.
    """

    name: str = "adam"
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    momentum: float = 0.99
    nesterov: bool = True
    schedule: str = "cosine"
    warmup_fraction: float = 0.02
    power: float = 0.9
    decay: float = 0.95
    min_lr_fraction: float = 0.0
    grad_clip: float | None = 12.0

    def __post_init__(self) -> None:
        check_choice(self.name, OPTIMIZERS, "optim.name")
        check_choice(self.schedule, SCHEDULES, "optim.schedule")
        _positive(self.lr, "optim.lr")
        _positive(self.weight_decay, "optim.weight_decay", allow_zero=True)
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"optim.warmup_fraction: expected 0 <= value < 1, got {self.warmup_fraction!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"optim.decay: expected 0 < value <= 1, got {self.decay!r}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise ConfigError(f"optim.min_lr_fraction: expected 0 <= value <= 1, got {self.min_lr_fraction!r}")
        if self.grad_clip is not None:
            _positive(self.grad_clip, "optim.grad_clip", allow_zero=True)


@dataclass(frozen=True)
class LabelDustConfig:
    """Training-label dust removal (:mod:`bratstune.training.label_dust`); off by default.

    Args:
        enabled: remove ground-truth lesions below the threshold from the training targets, under
            the lesion definition of ``validation.protocol`` (brats2023: dilation-merged components).
        min_volume: threshold in mm³; ``null`` = the protocol's official one for the challenge
            (brats2023: 50 mm³, MET 2 mm³); brats2026 has none, so it needs a number.
    """

    enabled: bool = False
    min_volume: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"data.label_dust.enabled: expected true or false, got {self.enabled!r}")
        if self.min_volume is not None:
            object.__setattr__(
                self, "min_volume", check_number(self.min_volume, "data.label_dust.min_volume", minimum=0.0)
            )


@dataclass(frozen=True)
class DataConfig:
    """Patch sampling, augmentation, preprocessing and background loading.

    Args:
        patch_size: training patch ``(P, P, P)`` (an int means isotropic).
        batch_size: patches per step.
        fg_prob: probability that a patch is centred on tumour.
        num_workers: DataLoader worker processes; ``null`` = automatic
            (``min(4, cpu_count // 2)``, at least 1); ``0`` loads in the training process.
        prefetch_factor: batches prepared ahead per worker.
        augment: mapping for ``bratstune.data.augment`` (its ``AugmentConfig``); ``null`` = none.
        preprocess: mapping for ``bratstune.data.preprocess.PreprocessConfig`` (used by the
            callers that build the cache, e.g. ``bratstune train``): ``target_spacing`` (mm,
            e.g. ``[2, 2, 2]``, the CPU presets' value; ``null`` = the cohort's median spacing),
            ``orientation`` (default ``RAS``), ``crop_to_brain``, ``margin``, ``normalize``,
            ``percentile_rescale``, ``histogram_match``.
        variant: name of a preprocessing variant a search prepared before its trials (the space's
            ``data.variants``); the trial trains on that cached variant and records its config
            here under ``preprocess``; ``null`` = the search's default preprocessing.
        label_dust: :class:`LabelDustConfig` (remove small ground-truth lesions from the targets).
    """

    patch_size: tuple[int, int, int] | int = (48, 48, 48)
    batch_size: int = 2
    fg_prob: float = 0.7
    num_workers: int | None = None
    prefetch_factor: int = 2
    augment: dict[str, Any] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None
    label_dust: LabelDustConfig = field(default_factory=LabelDustConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", to_triple(self.patch_size, "data.patch_size"))
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: expected an integer >= 1, got {self.batch_size!r}")
        if not 0.0 <= self.fg_prob <= 1.0:
            raise ConfigError(f"data.fg_prob: expected 0 <= value <= 1, got {self.fg_prob!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0 or null, got {self.num_workers!r}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor: expected >= 1, got {self.prefetch_factor!r}")


@dataclass(frozen=True)
class ValidationConfig:
    """Sliding-window validation on whole (cropped) volumes and best-checkpoint selection.

    Args:
        every_n_epochs: validate after every n-th epoch (and always after the last).
        overlap: sliding-window overlap in ``[0, 1)``.
        roi_size: window size (an int means isotropic); ``null`` = the training patch size.
        sw_batch_size: windows per forward pass.
        blend: ``gaussian`` or ``constant`` window blending.
        metric: metric that selects the best checkpoint, e.g. ``val/dice_mean`` or
            ``val/dice_lesion_mean``.
        metric_mode: ``max`` or ``min``.
        lesion_metrics: also compute BraTS lesion-wise metrics (``bratstune.metrics``).
        protocol: lesion-wise rules, ``brats2023`` (GLI/SSA/PED/MEN/MET) or ``brats2026``.
        postprocess: post-processing applied to the predicted labels before every validation
            metric (``bratstune.inference.postprocess.PostprocessConfig`` keys, e.g.
            ``{min_size: {WT: 100, TC: 50, ET: 20}}``); ``{}`` = none. Searches score trials
            after the default dust removal (``bratstune.inference.decode.DEFAULT_POSTPROCESS``).
        max_cases: validate on at most this many cases (the first ones); ``null`` = all.
    """

    every_n_epochs: int = 1
    overlap: float = 0.25
    roi_size: tuple[int, int, int] | int | None = None
    sw_batch_size: int = 2
    blend: str = "gaussian"
    metric: str = "val/dice_mean"
    metric_mode: str = "max"
    lesion_metrics: bool = True
    protocol: str = "brats2023"
    postprocess: dict[str, Any] = field(default_factory=dict)
    max_cases: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.protocol, PROTOCOLS, "validation.protocol")
        if self.every_n_epochs < 1:
            raise ConfigError(f"validation.every_n_epochs: expected >= 1, got {self.every_n_epochs!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"validation.overlap: expected 0 <= value < 1, got {self.overlap!r}")
        if self.roi_size is not None:
            object.__setattr__(self, "roi_size", to_triple(self.roi_size, "validation.roi_size"))
        if self.sw_batch_size < 1:
            raise ConfigError(f"validation.sw_batch_size: expected >= 1, got {self.sw_batch_size!r}")
        check_choice(self.blend, BLEND_MODES, "validation.blend")
        check_choice(self.metric_mode, METRIC_MODES, "validation.metric_mode")
        if not self.metric.startswith("val/"):
            raise ConfigError(
                f"validation.metric: expected a validation metric name such as 'val/dice_mean', got {self.metric!r}"
            )


@dataclass(frozen=True)
class InitConfig:
    """Weight initialisation before training (:mod:`bratstune.models.encoder_init`).

    Args:
        encoder_from: where the weights come from: ``models:/bratstune-mae-encoder@latest``
            (a registered MAE encoder; ``models:/NAME/VERSION`` and ``@alias`` too),
            ``runs:/RUN_ID/encoder``, a bare MLflow run id, or a ``.pt`` file / folder holding a
            state dict (or ``{"model": state_dict}``). Every tensor whose name and shape match
            the model is loaded; position embeddings of another patch grid are interpolated.
        strip_prefix: prefix removed from the file's keys before matching (e.g. ``"encoder."``).
        interpolate_pos_embed: resample position embeddings to the model's patch grid
            (otherwise they are reported as mismatched and skipped).
        require_complete: fail unless every tensor of the model's ``encoder`` group was
            initialised from the source.
    """

    encoder_from: str | Path | None = None
    strip_prefix: str = ""
    interpolate_pos_embed: bool = True
    require_complete: bool = False

    def __post_init__(self) -> None:
        if self.encoder_from is not None:
            object.__setattr__(self, "encoder_from", str(self.encoder_from))


@dataclass(frozen=True)
class TrainConfig:
    """Everything :func:`bratstune.training.fit.fit` needs besides the data.

    Args:
        model, loss, optim, data, validation, init: the sections above.
        freeze: layer groups kept frozen (``encoder``, ``middle``, ``decoder``, ``head``).
        epochs: number of epochs.
        steps_per_epoch: optimisation steps per epoch.
        seed: seeds torch, numpy, random and the DataLoader workers.
        num_threads: ``torch.set_num_threads``; ``null`` leaves torch's default.
        amp: ``auto`` (on for CUDA, off for CPU), ``on`` or ``off``; bf16 where supported,
            else fp16 with a gradient scaler.
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        challenge: BraTS challenge (``GLI``, ``PED``, ...) whose lesion-wise rules validation
            applies; ``null`` = from the data's naming (``bratstune train``), GLI's rules in
            :func:`~bratstune.training.fit.fit`. The label scheme always comes from the data.
        checkpoint_every: write a resumable checkpoint every n epochs (and after the last).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    init: InitConfig = field(default_factory=InitConfig)
    freeze: tuple[str, ...] = ()
    epochs: int = 30
    steps_per_epoch: int = 50
    seed: int = 0
    num_threads: int | None = None
    amp: str = "auto"
    device: str = "auto"
    challenge: str | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "freeze", tuple(self.freeze))
        if self.epochs < 1:
            raise ConfigError(f"epochs: expected an integer >= 1, got {self.epochs!r}")
        if self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch: expected an integer >= 1, got {self.steps_per_epoch!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: expected an integer >= 1 or null, got {self.num_threads!r}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every: expected an integer >= 1, got {self.checkpoint_every!r}")
        check_choice(self.amp, AMP_MODES, "amp")
        check_choice(self.device, DEVICES, "device")
        dust = self.data.label_dust
        if dust.enabled and dust.min_volume is None and self.validation.protocol != "brats2023":
            raise ConfigError(
                f"data.label_dust.min_volume: protocol {self.validation.protocol} has no official lesion size "
                "threshold; give one in mm³"
            )

    @property
    def total_steps(self) -> int:
        """Optimisation steps of the whole run."""
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe mapping that :func:`load_train_config` reads back."""
        return to_dict(self)


def load_train_config(mapping: Mapping[str, Any] | TrainConfig | None) -> TrainConfig:
    """Validate a mapping (YAML, preset, Ray Tune ``config``) into a :class:`TrainConfig`.

    Raises:
        ConfigError: unknown key (with the nearest valid key) or bad value.
    """
    if isinstance(mapping, TrainConfig):
        return mapping
    return from_dict(TrainConfig, mapping or {}, where="config")
