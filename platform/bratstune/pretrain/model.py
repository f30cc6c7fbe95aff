"""A 3-D masked autoencoder whose encoder *is* UNETR's ViT (He et al. 2022, "Masked
Autoencoders Are Scalable Vision Learners", arXiv:2111.06377, adapted to 4-channel volumes).

* Encoder: MONAI ``ViT`` built with exactly the arguments ``monai.networks.nets.UNETR`` uses
  (conv patch embedding, learnable position embeddings, no class token, ``qkv_bias=False``),
  stored as the submodule ``vit``. Its state-dict keys (``vit.patch_embedding.*``,
  ``vit.blocks.<i>.*``, ``vit.norm.*``) are UNETR's, so the weights transfer one-to-one
  (:func:`encoder_state_dict`). Only the visible tokens pass through it.
* Masking: per sample, a uniformly random subset of ``N - round((1 - r) N)`` of the ``N``
  patch tokens is hidden (``r = mask_ratio``, 0.75 by default).
* Decoder (light): linear projection to ``decoder_hidden_size``, a learned mask token in the
  hidden places, fixed sin-cos position embeddings, a few transformer blocks, a linear head
  predicting every voxel of every channel of each patch.
* Loss (:func:`mae_loss`): mean squared error on the **masked** patches only; with
  ``norm_pix_loss`` each target patch ``t`` (all channels and voxels of one patch) is first
  standardised by its own statistics, :math:`\\hat t = (t - \\mu_t) / \\sqrt{\\sigma_t^2 + 10^{-6}}`.

Shapes: images ``(B, C, X, Y, Z)``; tokens ``(B, N, D)`` with ``N = prod(img_size / patch)``
ordered like the conv patch embedding's ``flatten`` (x slowest, z fastest); patches
``(B, N, px * py * pz * C)`` (:func:`patchify`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.blocks.transformerblock import TransformerBlock
from monai.networks.nets.vit import ViT
from torch import nn

from bratstune.data.case import MODALITIES
from bratstune.pretrain.config import MaeModelConfig

__all__ = [
    "ENCODER_FORMAT",
    "MaskedAutoencoder3D",
    "encoder_meta",
    "encoder_state_dict",
    "mae_loss",
    "normalise_patches",
    "parameter_digest",
    "patchify",
    "random_noise",
    "unpatchify",
    "weight_decay_groups",
]

#: ``format`` field of an exported encoder (``encoder.pt`` / ``encoder.json``)
ENCODER_FORMAT = "bratstune-mae-encoder/1"
#: prefix of the encoder keys in an exported state dict (UNETR's ViT submodule)
ENCODER_PREFIX = "vit."


def patchify(images: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``(B, C, X, Y, Z)`` -> ``(B, N, px*py*pz*C)``, tokens in conv-flatten order."""
    b, c, x, y, z = images.shape
    px, py, pz = patch
    if x % px or y % py or z % pz:
        raise ValueError(f"image size {(x, y, z)} is not divisible by the patch size {tuple(patch)}")
    gx, gy, gz = x // px, y // py, z // pz
    out = images.reshape(b, c, gx, px, gy, py, gz, pz).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return out.reshape(b, gx * gy * gz, px * py * pz * c)


def unpatchify(patches: torch.Tensor, patch: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, px*py*pz*C)`` -> ``(B, C, X, Y, Z)``."""
    b = patches.shape[0]
    px, py, pz = patch
    gx, gy, gz = grid
    out = patches.reshape(b, gx, gy, gz, px, py, pz, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(b, channels, gx * px, gy * py, gz * pz)


def random_noise(rng: np.random.Generator, batch: int, tokens: int) -> torch.Tensor:
    """Uniform noise ``(B, N)`` whose argsort picks the visible tokens (reproducible from ``rng``)."""
    return torch.from_numpy(rng.random((batch, tokens), dtype=np.float32))


class MaskedAutoencoder3D(nn.Module):
    """MAE over ``(B, C, X, Y, Z)`` volumes of exactly ``config.img_size``.

    Args:
        config: :class:`~bratstune.pretrain.config.MaeModelConfig`.

    ``forward(images, noise=None)`` returns ``(pred, mask)``: ``pred`` ``(B, N, P)`` patch
    predictions for every token (only the masked ones enter the loss) and ``mask`` ``(B, N)``
    bool, ``True`` where the token was hidden from the encoder. ``noise`` ``(B, N)`` fixes the
    masking (the ``N_keep`` tokens with the smallest noise stay visible); default uniform.
    """

    def __init__(self, config: MaeModelConfig) -> None:
        super().__init__()

        self.config = config
        self.vit = ViT(
            in_channels=config.in_channels,
            img_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            mlp_dim=config.mlp_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=0.0,
            spatial_dims=3,
            qkv_bias=False,
        )
        d = config.decoder_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        pos = build_sincos_position_embedding(list(config.grid), d, 3)
        self.register_buffer("decoder_pos_embed", pos.detach().clone(), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(d, config.decoder_mlp_dim, config.decoder_num_heads, 0.0, False)
            for _ in range(config.decoder_num_layers)
        )
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, math.prod(config.patch_size) * config.in_channels)
        # MONAI's TransformerBlock always creates ``norm_cross_attn`` but only uses it with
        # cross-attention: keep it (UNETR has the same keys) but out of the optimiser and DDP.
        for name, param in self.named_parameters():
            if ".norm_cross_attn." in name:
                param.requires_grad_(False)

    @property
    def patch_dim(self) -> int:
        return math.prod(self.config.patch_size) * self.config.in_channels

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder on the visible tokens ``keep`` ``(B, N_keep)``: ``(B, N_keep, D)`` after ``vit.norm``."""
        tokens = self.vit.patch_embedding(images)  # (B, N, D), position embeddings added
        visible = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for block in self.vit.blocks:
            visible = block(visible)
        return self.vit.norm(visible)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        expected = tuple(self.config.img_size)
        if images.ndim != 5 or tuple(images.shape[2:]) != expected or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images (B, {self.config.in_channels}, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}; crop or pad to model.img_size"
            )
        b, n = images.shape[0], self.config.num_tokens
        if noise is None:
            noise = torch.rand(b, n, device=images.device)
        noise = noise.to(images.device)
        order = torch.argsort(noise, dim=1)
        keep = order[:, : self.config.visible_tokens]
        mask = torch.ones(b, n, dtype=torch.bool, device=images.device)
        mask.scatter_(1, keep, False)
        latent = self.decoder_embed(self.encode_visible(images, keep))
        d = latent.shape[-1]
        full = self.mask_token.to(latent.dtype).expand(b, n, d).scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), latent)
        x = full + self.decoder_pos_embed.to(full.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x)), mask


def normalise_patches(target: torch.Tensor, eps: float = 1.0e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardise each patch (last axis) by its own mean and std; returns ``(t_hat, mean, std)``."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()
    return (target - mean) / std, mean, std


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool = True
) -> torch.Tensor:
    """Mean squared error over the masked patches.

    Args:
        pred: ``(B, N, P)`` predictions.
        target: ``(B, N, P)`` patches of the input (:func:`patchify`).
        mask: ``(B, N)`` bool (or 0/1), true for masked tokens.
        norm_pix_loss: standardise each target patch by its own mean and std first.

    Returns:
        :math:`\\sum_{b,n} m_{bn} \\overline{(p_{bn} - t_{bn})^2} / \\sum m_{bn}`.
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"expected pred/target (B, N, P) and mask (B, N), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}"
        )
    if norm_pix_loss:
        target = normalise_patches(target)[0]
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms (1-D), position embeddings and the mask token."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith("position_embeddings") or name.endswith("mask_token"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ViT's tensors named like UNETR's (``vit.*``), detached on the CPU."""
    vit = _unwrap(model).vit
    return {f"{ENCODER_PREFIX}{k}": v.detach().cpu().clone() for k, v in vit.state_dict().items()}


def encoder_meta(config: MaeModelConfig, **extra: Any) -> dict[str, Any]:
    """What a consumer needs to check / adapt the encoder (grid for position-embedding interpolation)."""

    return {
        "format": ENCODER_FORMAT,
        "prefix": ENCODER_PREFIX,
        "architecture": "monai.ViT (UNETR encoder)",
        "img_size": list(config.img_size),
        "patch_size": list(config.patch_size),
        "grid": list(config.grid),
        "hidden_size": config.hidden_size,
        "mlp_dim": config.mlp_dim,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "in_channels": config.in_channels,
        "modalities": list(MODALITIES[: config.in_channels]),
        **extra,
    }


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (state-dict order, CPU float32): equal iff identical."""
    h = hashlib.sha256()
    for name, param in _unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
