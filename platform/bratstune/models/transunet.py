"""3D-TransUNet (Chen et al., arXiv:2310.07781; 2nd place BraTS-METS 2023), both variants, from MONAI blocks.

Both share an nnU-Net-style CNN: kernels and strides from :func:`bratstune.models.nnunet_topology`
(patch size, spacing, at most ``len(filters)`` levels), MONAI ``UnetBasicBlock`` (or
``UnetResBlock`` with ``res_block=True``) per encoder level (submodule ``encoder``), MONAI
``UnetUpBlock`` per decoder level (transposed convolution, skip concatenation, two convolutions;
submodule ``decoder``), instance norm, leaky ReLU.

* :class:`TransUNetEncoderOnly` (``transunet_enc``): the deepest encoder feature map
  ``(B, C_L, gx, gy, gz)`` is tokenised (one token per voxel, a 1x1x1 convolution to ``d``
  channels + learnable position embeddings) and passed through a MONAI ``ViT``'s transformer
  blocks (12 layers, ``d = 768`` in the paper), projected back to ``C_L`` channels and decoded
  by the U-Net decoder. Submodule ``transformer.vit`` has MONAI ``ViT``'s key names, so an MAE
  encoder (``bratstune-mae-encoder``) initialises its blocks
  (:mod:`bratstune.models.encoder_init`); its patch embedding differs from the MAE's and is not
  transferred. Deep supervision like MONAI ``DynUNet``: in training mode the output is stacked
  ``(B, 1 + deep_supr_num, C, X, Y, Z)``, heads upsampled to full size; in eval mode
  ``(B, C, X, Y, Z)``.
* :class:`TransUNetDecoderOnly` (``transunet_dec``): the CNN, plus a 3-layer query decoder
  (``d_dec = 192``) over the CNN decoder's multi-scale features
  (:mod:`bratstune.models.query_decoder`). In training mode the output is the query set
  ``{"pred_logits": (B, N, K + 1), "pred_masks": (B, N, X, Y, Z), "aux_outputs": [...]}``
  (``aux_outputs``: the same after each earlier layer, with ``deep_supervision``) for the
  Hungarian-matched loss (:mod:`bratstune.training.mask_loss`); in eval mode the region
  logits ``(B, K, X, Y, Z)`` of :func:`~bratstune.models.query_decoder.region_logits`, so
  validation, inference, thresholds and ensembles consume it like any other network.

The ViT's position embeddings (``transunet_enc``) fix the bottleneck grid: inference windows must
be the training patch size (sliding window with ``roi_size = patch_size``), as for UNETR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets.vit import ViT
from torch import nn

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError
from bratstune.models.query_decoder import QueryDecoder, QueryHead, region_logits
from bratstune.models.topology import Triple, nnunet_topology, to_triple

__all__ = [
    "QUERY_ARCHITECTURES",
    "BottleneckViT",
    "TransUNetDecoderOnly",
    "TransUNetEncoderOnly",
    "build_transunet_dec",
    "build_transunet_enc",
]

#: architectures whose training-mode output is a query set trained with the Hungarian loss
QUERY_ARCHITECTURES: tuple[str, ...] = ("transunet_dec",)

_NORMS = ("instance", "batch")


class _ConvUNet(nn.Module):
    """nnU-Net-style CNN encoder (``encoder``) and decoder (``decoder``) from MONAI blocks.

    ``encode(x)`` returns the encoder outputs, full resolution first (the last = deepest);
    ``decode(x, skips)`` returns the decoder outputs from coarse to fine (the last = full resolution).
    Convolutions start from He initialisation (nnU-Net's ``InitWeights_He(1e-2)``, as MONAI
    ``DynUNet`` does); the transformer parts keep their own (MONAI ``ViT``, PyTorch attention).
    """

    def __init__(
        self,
        in_channels: int,
        filters: Sequence[int],
        kernels: Sequence[Triple],
        strides: Sequence[Triple],
        *,
        norm: str,
        res_block: bool,
        dropout: float | None,
    ) -> None:
        super().__init__()
        norm_arg: Any = (norm, {"affine": True})
        block = UnetResBlock if res_block else UnetBasicBlock
        channels = [in_channels, *filters]
        self.filters = tuple(filters)
        self.strides = tuple(strides)
        self.encoder = nn.ModuleList(
            block(3, channels[i], channels[i + 1], kernels[i], strides[i], norm_name=norm_arg, dropout=dropout)
            for i in range(len(filters))
        )
        self.decoder = nn.ModuleList(
            UnetUpBlock(
                3,
                filters[i + 1],
                filters[i],
                kernel_size=kernels[i],
                stride=1,
                upsample_kernel_size=strides[i + 1],
                norm_name=norm_arg,
                dropout=dropout,
            )
            for i in reversed(range(len(filters) - 1))
        )
        self.he_init(self.encoder, self.decoder)

    @staticmethod
    def he_init(*modules: nn.Module) -> None:
        """Kaiming-normal weights (negative slope 0.01) and zero biases for every convolution in ``modules``."""
        for module in modules:
            for layer in module.modules():
                if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)):
                    nn.init.kaiming_normal_(layer.weight, a=0.01)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips

    def decode(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for index, block in enumerate(self.decoder):
            x = block(x, skips[-2 - index])
            outputs.append(x)
        return outputs


class BottleneckViT(nn.Module):
    """Tokenise a feature map, run MONAI ``ViT`` blocks, project back (3D-TransUNet's encoder transformer).

    ``vit`` is a MONAI ``ViT`` on the ``grid`` with 1x1x1 "patches" (its ``patch_embedding`` =
    1x1x1 convolution to ``hidden_size`` + learnable position embeddings); ``unproject`` is a 1x1x1
    convolution back to ``channels``. MONAI's ``TransformerBlock`` creates a ``norm_cross_attn``
    LayerNorm that it only uses with cross-attention; it is replaced by ``nn.Identity`` here so
    that no parameter sits outside the computation (the optimiser and freezing see only live weights).

    Shapes:
        ``(B, channels, *grid)`` -> ``(B, channels, *grid)``.
    """

    def __init__(
        self,
        channels: int,
        grid: Triple,
        *,
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        dropout_rate: float,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.vit = ViT(
            in_channels=channels,
            img_size=grid,
            patch_size=1,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=3,
            qkv_bias=False,
        )
        for block in self.vit.blocks:
            block.norm_cross_attn = nn.Identity()
        self.unproject = nn.Conv3d(hidden_size, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.grid:
            raise ValueError(
                f"transunet_enc: bottleneck grid {tuple(x.shape[2:])} differs from the training grid {self.grid} "
                "(fixed position embeddings): inputs must have the training patch size (sliding window roi_size "
                "= patch_size)"
            )
        tokens, _ = self.vit(x)  # (B, N, d) after the final LayerNorm
        volume = tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], *self.grid)
        return self.unproject(volume)


class TransUNetEncoderOnly(_ConvUNet):
    """``transunet_enc``: CNN encoder -> ViT on the deepest feature map -> U-Net decoder (+ deep supervision)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: Sequence[int],
        kernels: Sequence[Triple],
        strides: Sequence[Triple],
        grid: Triple,
        *,
        norm: str,
        res_block: bool,
        dropout: float | None,
        deep_supervision: bool,
        deep_supr_num: int,
        vit: dict[str, Any],
    ) -> None:
        super().__init__(in_channels, filters, kernels, strides, norm=norm, res_block=res_block, dropout=dropout)
        self.transformer = BottleneckViT(filters[-1], grid, **vit)
        self.out = UnetOutBlock(3, filters[0], out_channels)
        self.deep_supervision = bool(deep_supervision)
        if self.deep_supervision:
            self.ds_heads = nn.ModuleList(
                UnetOutBlock(3, filters[i], out_channels) for i in range(1, deep_supr_num + 1)
            )
            self.he_init(self.ds_heads)
        self.he_init(self.out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encode(x)
        features = self.decode(self.transformer(skips[-1]), skips)
        out = self.out(features[-1])
        if not (self.training and self.deep_supervision):
            return out
        heads = [out]
        for level, head in enumerate(self.ds_heads, start=1):  # like DynUNet: upsampled to full size
            heads.append(F.interpolate(head(features[-1 - level]), size=out.shape[2:]))
        return torch.stack(heads, dim=1)


class TransUNetDecoderOnly(_ConvUNet):
    """``transunet_dec``: CNN encoder + decoder, query decoder over its multi-scale features, mask heads."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: Sequence[int],
        kernels: Sequence[Triple],
        strides: Sequence[Triple],
        *,
        norm: str,
        res_block: bool,
        dropout: float | None,
        query_levels: Sequence[int],
        deep_supervision: bool,
        queries: dict[str, Any],
    ) -> None:
        super().__init__(in_channels, filters, kernels, strides, norm=norm, res_block=res_block, dropout=dropout)
        self.query_levels = tuple(int(v) for v in query_levels)
        self.deep_supervision = bool(deep_supervision)
        self.query_decoder = QueryDecoder([filters[level] for level in self.query_levels], **queries)
        self.query_head = QueryHead(queries["hidden_size"], out_channels, filters[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        skips = self.encode(x)
        decoded = self.decode(skips[-1], skips)
        by_level = [*reversed(decoded), skips[-1]]  # index = resolution level (0 = full)
        states = self.query_decoder([by_level[level] for level in self.query_levels])
        mask_features = by_level[0]
        class_logits, mask_logits = self.query_head(states[-1], mask_features)
        if not self.training:
            return region_logits(class_logits, mask_logits)
        out: dict[str, Any] = {"pred_logits": class_logits, "pred_masks": mask_logits}
        if self.deep_supervision:
            out["aux_outputs"] = [
                dict(zip(("pred_logits", "pred_masks"), self.query_head(state, mask_features))) for state in states[:-1]
            ]
        return out


# --------------------------------------------------------------------------------------------
# builders (registered in bratstune.models.factory)
# --------------------------------------------------------------------------------------------


def _cnn_topology(
    arch: str,
    patch_size: Sequence[int] | int,
    spacing: Sequence[float] | float,
    filters: Sequence[int],
    norm: str,
    min_levels: int,
) -> tuple[Triple, tuple[int, ...], list[Triple], list[Triple], str]:
    patch = to_triple(patch_size, f"{arch}: patch_size")
    try:
        filt = tuple(int(v) for v in filters)
    except (TypeError, ValueError):
        raise ConfigError(f"{arch}: filters: expected a list of positive integers, got {filters!r}") from None
    if len(filt) < min_levels or any(v <= 0 for v in filt):
        raise ConfigError(f"{arch}: filters: expected at least {min_levels} positive integers, got {filters!r}")
    value = str(norm).lower()
    if value not in _NORMS:
        raise ConfigError(f"{arch}: unknown norm '{norm}'{suggest(value, _NORMS)}; expected one of {list(_NORMS)}")
    kernels, strides = nnunet_topology(patch, spacing, max_levels=len(filt))
    if len(strides) < min_levels:
        raise ConfigError(
            f"{arch}: patch_size {list(patch)} allows only {len(strides)} resolution levels; it needs at least "
            f"{min_levels} (use a patch of at least {4 * 2 ** (min_levels - 1)} voxels per axis)"
        )
    total = [math.prod(s[axis] for s in strides) for axis in range(3)]
    for axis, (p, t) in enumerate(zip(patch, total)):
        if p % t:
            raise ConfigError(
                f"{arch}: patch_size {list(patch)} is not divisible by the total stride {total} (axis {axis}); "
                f"use multiples of {t}"
            )
    return patch, filt[: len(strides)], kernels, strides, value


def _check_heads(arch: str, hidden_size: int, num_heads: int, *, sincos: bool = False) -> None:
    if int(hidden_size) < 1 or int(num_heads) < 1 or int(hidden_size) % int(num_heads):
        raise ConfigError(f"{arch}: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if sincos and int(hidden_size) % 6:
        raise ConfigError(
            f"{arch}: hidden_size must be divisible by 6 (3-D sin-cos position embeddings), got {hidden_size}; "
            f"try {max(6, int(hidden_size) // 6 * 6)}"
        )


def build_transunet_enc(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    filters: Sequence[int] = (16, 32, 64, 128),
    norm: str = "instance",
    res_block: bool = False,
    dropout: float | None = None,
    deep_supervision: bool = True,
    deep_supr_num: int = 2,
    hidden_size: int = 384,
    mlp_dim: int = 1536,
    num_layers: int = 12,
    num_heads: int = 6,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """3D-TransUNet, encoder-only (see the module docstring).

    The defaults fit a CPU (48³ patches, a 6³ bottleneck of 216 tokens) and the default MAE
    encoder (``hidden_size 384, mlp_dim 1536, num_heads 6``, 12 layers), so ``init.encoder_from``
    loads every ViT block; the paper uses ``d = 768, mlp_dim 3072, 12 heads`` (preset
    ``transunet_enc_gpu``).
    """
    arch = "transunet_enc"
    patch, filt, kernels, strides, norm = _cnn_topology(arch, patch_size, spacing, filters, norm, 3)
    levels = len(strides)
    if deep_supervision and not 1 <= int(deep_supr_num) <= levels - 2:
        raise ConfigError(
            f"{arch}: deep_supr_num must be between 1 and {levels - 2} for {levels} levels, got {deep_supr_num!r}"
        )
    _check_heads(arch, hidden_size, num_heads)
    total = [math.prod(s[axis] for s in strides) for axis in range(3)]
    grid = tuple(p // t for p, t in zip(patch, total))
    return TransUNetEncoderOnly(
        in_channels,
        out_channels,
        filt,
        kernels,
        strides,
        grid,  # type: ignore[arg-type]
        norm=norm,
        res_block=bool(res_block),
        dropout=dropout,
        deep_supervision=bool(deep_supervision),
        deep_supr_num=int(deep_supr_num),
        vit={
            "hidden_size": int(hidden_size),
            "mlp_dim": int(mlp_dim),
            "num_layers": int(num_layers),
            "num_heads": int(num_heads),
            "dropout_rate": float(dropout_rate),
        },
    )


def build_transunet_dec(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    filters: Sequence[int] = (16, 32, 64, 128),
    norm: str = "instance",
    res_block: bool = False,
    dropout: float | None = None,
    hidden_size: int = 192,
    num_queries: int = 20,
    num_layers: int = 3,
    num_heads: int = 8,
    mlp_dim: int = 1536,
    query_levels: Sequence[int] | None = None,
    deep_supervision: bool = True,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """3D-TransUNet, decoder-only (see the module docstring); the defaults are the paper's query decoder.

    Args (besides the CNN's, as for ``unet``):
        hidden_size: query width ``d_dec`` (192; divisible by 6 and ``num_heads``).
        num_queries: ``N`` learnable queries (20 in the authors' BraTS configuration; at least
            the number of regions).
        num_layers: transformer decoder layers (3).
        num_heads, mlp_dim: attention heads (8) and MLP width (``8 d``).
        query_levels: resolution levels the layers attend to, one per layer in turn
            (0 = full resolution); default the three levels above full resolution, coarse to fine.
        deep_supervision: return the query set after every layer in training mode (the loss
            matches and weights each one).
    """
    arch = "transunet_dec"
    _, filt, kernels, strides, norm = _cnn_topology(arch, patch_size, spacing, filters, norm, 2)
    levels = len(strides)
    if query_levels is None:
        query_levels = tuple(range(min(3, levels - 1), 0, -1))
    try:
        chosen = tuple(int(v) for v in query_levels)
    except (TypeError, ValueError):
        raise ConfigError(f"{arch}: query_levels: expected a list of integers, got {query_levels!r}") from None
    if not chosen or any(not 0 <= v < levels for v in chosen):
        raise ConfigError(
            f"{arch}: query_levels {list(chosen)} must be resolution levels in [0, {levels - 1}] "
            f"(0 = full resolution) for {levels} levels"
        )
    _check_heads(arch, hidden_size, num_heads, sincos=True)
    if int(num_queries) < out_channels:
        raise ConfigError(
            f"{arch}: num_queries {num_queries} must be at least the number of regions ({out_channels}) "
            "so that every region can be matched"
        )
    if int(num_layers) < 1 or int(mlp_dim) < 1:
        raise ConfigError(f"{arch}: num_layers and mlp_dim must be >= 1, got {num_layers!r}, {mlp_dim!r}")
    return TransUNetDecoderOnly(
        in_channels,
        out_channels,
        filt,
        kernels,
        strides,
        norm=norm,
        res_block=bool(res_block),
        dropout=dropout,
        query_levels=chosen,
        deep_supervision=bool(deep_supervision),
        queries={
            "hidden_size": int(hidden_size),
            "num_queries": int(num_queries),
            "num_layers": int(num_layers),
            "num_heads": int(num_heads),
            "mlp_dim": int(mlp_dim),
            "dropout_rate": float(dropout_rate),
        },
    )
