"""Typed configuration of MAE pre-training (:func:`bratstune.pretrain.run.run_mae`).

The YAML shape (every key optional; defaults match the ``unetr`` preset's ViT, so the
exported encoder loads one-to-one into ``build_model("unetr", ...)`` with 48^3 patches)::

    model: {img_size: [48, 48, 48], patch_size: 16, hidden_size: 384, mlp_dim: 1536,
            num_layers: 12, num_heads: 6, decoder_hidden_size: 192, decoder_mlp_dim: 384,
            decoder_num_layers: 2, decoder_num_heads: 6, mask_ratio: 0.75, norm_pix_loss: true}
    optim: {lr: 1.5e-4, weight_decay: 0.05, betas: [0.9, 0.95], warmup_fraction: 0.05,
            min_lr_fraction: 0.0, lr_scaling: linear, reference_batch_size: null, grad_clip: null}
    data: {batch_size: 2, flip_prob: 0.5, preprocess: {}}
    epochs: 20
    steps_per_epoch: 25
    seed: 0
    num_threads: null
    checkpoint_every: 1

Learning-rate scaling with the number of workers: the effective (global) batch is
``batch_size * workers``; ``lr`` is the peak rate at ``reference_batch_size`` (default: one
worker's ``batch_size``) and the rate used is ``lr * scale`` with ``scale = B_eff / B_ref``
(``linear``), ``sqrt(B_eff / B_ref)`` (``sqrt``) or 1 (``none``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bratstune.config_utils import check_choice, from_dict, to_dict, to_triple
from bratstune.errors import ConfigError

__all__ = ["LR_SCALINGS", "MaeDataConfig", "MaeModelConfig", "MaeOptimConfig", "PretrainConfig", "load_pretrain_config"]

LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class MaeModelConfig:
    """The masked autoencoder: a MONAI ``ViT`` encoder (as UNETR's ``vit``) + a light decoder.

    Args:
        img_size: crop size the encoder sees (its patch grid fixes the position embeddings).
        patch_size: ViT patch size; 16 is what UNETR uses (anything else does not transfer).
        hidden_size, mlp_dim, num_layers, num_heads: the ViT (UNETR always has 12 layers).
        decoder_hidden_size, decoder_mlp_dim, decoder_num_layers, decoder_num_heads: decoder.
        mask_ratio: fraction of patch tokens hidden from the encoder, in ``(0, 1)``.
        norm_pix_loss: standardise each target patch by its own mean and std.
        in_channels: image channels (the four modalities).
    """

    img_size: tuple[int, int, int] | int = (48, 48, 48)
    patch_size: tuple[int, int, int] | int = 16
    hidden_size: int = 384
    mlp_dim: int = 1536
    num_layers: int = 12
    num_heads: int = 6
    decoder_hidden_size: int = 192
    decoder_mlp_dim: int = 384
    decoder_num_layers: int = 2
    decoder_num_heads: int = 6
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    in_channels: int = 4

    def __post_init__(self) -> None:
        img = to_triple(self.img_size, "model.img_size")
        patch = to_triple(self.patch_size, "model.patch_size")
        object.__setattr__(self, "img_size", img)
        object.__setattr__(self, "patch_size", patch)
        for axis, (i, p) in enumerate(zip(img, patch)):
            if i % p:
                raise ConfigError(
                    f"model.img_size {list(img)} must be divisible by model.patch_size {list(patch)} "
                    f"(axis {axis}); try img_size {[math.ceil(a / b) * b for a, b in zip(img, patch)]}"
                )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio: expected 0 < value < 1, got {self.mask_ratio!r}")
        if self.visible_tokens < 1:
            raise ConfigError(
                f"model.mask_ratio {self.mask_ratio} leaves no visible token of {self.num_tokens}; "
                "lower it or use a larger img_size"
            )
        for name in (
            "hidden_size",
            "mlp_dim",
            "num_layers",
            "num_heads",
            "decoder_hidden_size",
            "decoder_mlp_dim",
            "decoder_num_layers",
            "decoder_num_heads",
            "in_channels",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.decoder_hidden_size % 6:
            raise ConfigError(
                f"model.decoder_hidden_size must be divisible by 6 (3-D sin-cos position embeddings), "
                f"got {self.decoder_hidden_size}; try {max(6, self.decoder_hidden_size // 6 * 6)}"
            )
        if self.decoder_hidden_size % self.decoder_num_heads:
            raise ConfigError(
                f"model.decoder_hidden_size {self.decoder_hidden_size} must be divisible by "
                f"decoder_num_heads {self.decoder_num_heads}"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid ``img_size // patch_size``."""
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def visible_tokens(self) -> int:
        """Tokens the encoder sees: ``round((1 - mask_ratio) * N)`` (at least 1 when possible)."""
        return int(round((1.0 - self.mask_ratio) * self.num_tokens))


@dataclass(frozen=True)
class MaeOptimConfig:
    """AdamW with linear warm-up then cosine decay, stepped per optimisation step.

    Args:
        lr: peak learning rate at ``reference_batch_size`` (see the module docstring).
        weight_decay: decoupled weight decay (not applied to biases, norms, embeddings, tokens).
        betas: AdamW betas.
        warmup_fraction: fraction of all steps spent in linear warm-up.
        min_lr_fraction: floor of the cosine, as a fraction of the peak rate.
        lr_scaling: ``linear``, ``sqrt`` or ``none`` scaling with the effective batch.
        reference_batch_size: batch at which ``lr`` applies; ``null`` = ``data.batch_size``.
        grad_clip: maximum gradient norm; ``null``/0 disables clipping.
    """

    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.0
    lr_scaling: str = "linear"
    reference_batch_size: int | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.lr_scaling, LR_SCALINGS, "optim.lr_scaling")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: expected a number > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: expected >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"optim.warmup_fraction: expected 0 <= value < 1, got {self.warmup_fraction!r}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise ConfigError(f"optim.min_lr_fraction: expected 0 <= value <= 1, got {self.min_lr_fraction!r}")
        if self.reference_batch_size is not None and self.reference_batch_size < 1:
            raise ConfigError(f"optim.reference_batch_size: expected >= 1 or null, got {self.reference_batch_size!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@dataclass(frozen=True)
class MaeDataConfig:
    """Random crops of ``model.img_size`` from preprocessed volumes, with random flips.

    Args:
        batch_size: crops per step **per worker**.
        flip_prob: probability of flipping each spatial axis.
        preprocess: ``bratstune.data.preprocess.PreprocessConfig`` mapping (cache key).
    """

    batch_size: int = 2
    flip_prob: float = 0.5
    preprocess: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: expected an integer >= 1, got {self.batch_size!r}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"data.flip_prob: expected 0 <= value <= 1, got {self.flip_prob!r}")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one MAE pre-training run needs besides the data and the cluster.

    Args:
        model, optim, data: the sections above.
        epochs: number of epochs; one epoch = ``steps_per_epoch`` steps on every worker.
        steps_per_epoch: optimisation steps per epoch.
        seed: model initialisation and the crop/mask streams (crop ``i`` of worker ``r`` in
            epoch ``e`` depends only on ``(seed, r, e, i)``, so a resumed run continues the stream).
        num_threads: ``torch.set_num_threads`` in each worker; ``null`` leaves the default.
        checkpoint_every: report a Ray Train checkpoint every n epochs (and after the last).
    """

    model: MaeModelConfig = field(default_factory=MaeModelConfig)
    optim: MaeOptimConfig = field(default_factory=MaeOptimConfig)
    data: MaeDataConfig = field(default_factory=MaeDataConfig)
    epochs: int = 20
    steps_per_epoch: int = 25
    seed: int = 0
    num_threads: int | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: expected an integer >= 1 or null, got {self.num_threads!r}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def effective_batch_size(self, workers: int) -> int:
        """Crops per optimisation step over all workers."""
        return self.data.batch_size * int(workers)

    def lr_scale(self, workers: int) -> float:
        """Factor applied to ``optim.lr`` for ``workers`` data-parallel workers."""
        ref = self.optim.reference_batch_size or self.data.batch_size
        ratio = self.effective_batch_size(workers) / ref
        if self.optim.lr_scaling == "linear":
            return ratio
        if self.optim.lr_scaling == "sqrt":
            return math.sqrt(ratio)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_pretrain_config(mapping: Mapping[str, Any] | PretrainConfig | None) -> PretrainConfig:
    """Validate a mapping (YAML) into a :class:`PretrainConfig` (nearest-key suggestions)."""
    if isinstance(mapping, PretrainConfig):
        return mapping
    return from_dict(PretrainConfig, mapping or {}, where="pretrain")
