"""Architecture factory: ``build_model(name, in_channels, out_channels, **kwargs)``.

Every network comes from MONAI (the 3D-TransUNet variants ``transunet_enc`` / ``transunet_dec``
are assembled from MONAI blocks in :mod:`bratstune.models.transunet`); this module only picks
sensible BraTS defaults, derives nnU-Net-style kernels/strides for the DynUNet, validates the options (``ConfigError`` naming
the bad value and the fix) and remembers the architecture name on the returned module
(``model.bratstune_arch``) so that :func:`bratstune.models.layer_groups` can name its parts.

Options common to every architecture (a training loop can always pass them):

* ``patch_size``: the training patch ``(X, Y, Z)`` (an int means isotropic). Used to derive
  the DynUNet topology and the UNETR token grid, and checked against each network's
  divisibility constraint so that a bad patch size fails here rather than deep in ``forward``.
* ``spacing``: voxel spacing in mm (only the ``unet`` topology uses it).

Architecture-specific options are keyword arguments of the ``_build_*`` functions below; an
unknown option raises ``ConfigError`` with the nearest valid name.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from monai.networks.nets import UNETR, AttentionUnet, DynUNet, SegResNet, SwinUNETR, UNet
from torch import nn

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError
from bratstune.models.topology import Triple, nnunet_topology, to_triple
from bratstune.models.transunet import build_transunet_dec, build_transunet_enc

__all__ = ["ARCHITECTURES", "architecture_options", "build_model", "count_parameters"]

logger = logging.getLogger(__name__)


def _filters(value: Sequence[int], what: str, *, minimum: int = 2) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a list of positive integers, got {value!r}") from None
    if len(out) < minimum or any(v <= 0 for v in out):
        raise ConfigError(f"{what}: expected at least {minimum} positive integers, got {value!r}")
    return out


def _check_divisible(patch: Triple, factor: int, arch: str, why: str) -> None:
    bad = [p for p in patch if p % factor]
    if bad:
        fixed = tuple(math.ceil(p / factor) * factor for p in patch)
        raise ConfigError(
            f"{arch}: patch_size {list(patch)} must be divisible by {factor} ({why}); try patch_size {list(fixed)}"
        )


# --------------------------------------------------------------------------------------------
# builders: one per architecture; keyword-only options, MONAI does the work
# --------------------------------------------------------------------------------------------


def _build_unet(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    filters: Sequence[int] = (16, 32, 64, 128),
    norm: str = "instance",
    deep_supervision: bool = True,
    deep_supr_num: int = 2,
    res_block: bool = False,
    dropout: float | None = None,
    kernel_size: Sequence[Sequence[int] | int] | None = None,
    strides: Sequence[Sequence[int] | int] | None = None,
) -> nn.Module:
    """nnU-Net-style ("optimized U-Net") MONAI ``DynUNet`` with deep supervision.

    Kernels and strides come from :func:`nnunet_topology` (patch size, spacing, at most
    ``len(filters)`` levels) unless given explicitly. With ``deep_supervision=True`` the
    module returns, **in training mode only**, a stacked tensor ``(B, 1 + deep_supr_num, C,
    X, Y, Z)``: index 0 is the full-resolution output, index ``i`` the head ``i`` levels
    higher up the decoder, already upsampled by MONAI to the full output size (so the loss
    can use the full-resolution target; see ``bratstune.training.losses.deep_supervision_loss``).
    In eval mode it returns the plain ``(B, C, X, Y, Z)`` output.
    """

    patch = to_triple(patch_size, "unet: patch_size")
    filt = _filters(filters, "unet: filters", minimum=3)
    norm = _norm_name(norm, "unet", ("instance", "batch", "group"))
    if (kernel_size is None) != (strides is None):
        raise ConfigError("unet: give both kernel_size and strides, or neither (then they are derived)")
    if kernel_size is None:
        kernels, stride_list = nnunet_topology(patch, spacing, max_levels=len(filt))
    else:
        kernels, stride_list = list(kernel_size), list(strides)  # type: ignore[arg-type]
    levels = len(stride_list)
    if levels < 3:
        raise ConfigError(
            f"unet: patch_size {list(patch)} allows only {levels} resolution levels; "
            "DynUNet needs at least 3 (use a patch of at least 16 voxels per axis)"
        )
    if len(filt) < levels:
        raise ConfigError(f"unet: filters {list(filt)} has fewer entries than the {levels} levels")
    total = [math.prod(_as_triple(s)[axis] for s in stride_list) for axis in range(3)]
    for axis, (p, t) in enumerate(zip(patch, total)):
        if p % t:
            raise ConfigError(
                f"unet: patch_size {list(patch)} is not divisible by the total stride {total} "
                f"(axis {axis}); use multiples of {t}"
            )
    if deep_supervision and not 1 <= int(deep_supr_num) <= levels - 2:
        raise ConfigError(
            f"unet: deep_supr_num must be between 1 and {levels - 2} for {levels} levels, got {deep_supr_num!r}"
        )
    norm_arg: Any = ("group", {"num_groups": 8}) if norm == "group" else (norm, {"affine": True})
    if norm == "group":
        _check_groups(filt[:levels], 8, "unet")
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=stride_list,
        upsample_kernel_size=stride_list[1:],
        filters=list(filt[:levels]),
        dropout=dropout,
        norm_name=norm_arg,
        deep_supervision=bool(deep_supervision),
        deep_supr_num=int(deep_supr_num) if deep_supervision else 1,
        res_block=bool(res_block),
    )


def _build_resunet(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    filters: Sequence[int] = (16, 32, 64, 128),
    num_res_units: int = 2,
    norm: str = "instance",
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``UNet`` with residual units (``num_res_units >= 1``), stride 2 per level."""

    del spacing  # isotropic strides; accepted so every architecture takes the same options
    filt = _filters(filters, "resunet: filters")
    if int(num_res_units) < 1:
        raise ConfigError(f"resunet: num_res_units must be >= 1 (residual U-Net), got {num_res_units!r}")
    _check_divisible(
        to_triple(patch_size, "resunet: patch_size"),
        2 ** (len(filt) - 1),
        "resunet",
        f"{len(filt) - 1} stride-2 levels",
    )
    norm = _norm_name(norm, "resunet", ("instance", "batch"))
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=filt,
        strides=(2,) * (len(filt) - 1),
        num_res_units=int(num_res_units),
        norm=norm,
        dropout=float(dropout),
    )


def _build_attention_unet(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    filters: Sequence[int] = (16, 32, 64, 128),
    dropout: float = 0.0,
) -> nn.Module:
    """MONAI ``AttentionUnet`` (attention gates on the skips; batch norm), stride 2 per level."""

    del spacing
    filt = _filters(filters, "attention_unet: filters")
    _check_divisible(
        to_triple(patch_size, "attention_unet: patch_size"),
        2 ** (len(filt) - 1),
        "attention_unet",
        f"{len(filt) - 1} stride-2 levels",
    )
    return AttentionUnet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=filt,
        strides=(2,) * (len(filt) - 1),
        dropout=float(dropout),
    )


def _build_unetr(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    feature_size: int = 16,
    hidden_size: int = 384,
    mlp_dim: int = 1536,
    num_heads: int = 6,
    proj_type: str = "conv",
    norm: str = "instance",
    dropout_rate: float = 0.0,
) -> nn.Module:
    """MONAI ``UNETR``: ViT encoder (16³-voxel patches, submodule ``vit``) + CNN decoder.

    ``patch_size`` is the ViT's ``img_size`` (fixed position embeddings): inference must use
    windows of exactly this size (sliding window with ``roi_size = patch_size``).
    """

    del spacing
    patch = to_triple(patch_size, "unetr: patch_size")
    _check_divisible(patch, 16, "unetr", "16³-voxel ViT patches")
    if int(hidden_size) % int(num_heads):
        raise ConfigError(f"unetr: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    return UNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=patch,
        feature_size=int(feature_size),
        hidden_size=int(hidden_size),
        mlp_dim=int(mlp_dim),
        num_heads=int(num_heads),
        proj_type=proj_type,
        norm_name=_norm_name(norm, "unetr", ("instance", "batch")),
        dropout_rate=float(dropout_rate),
    )


def _build_swin_unetr(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (64, 64, 64),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    feature_size: int = 24,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    norm: str = "instance",
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    dropout_path_rate: float = 0.0,
    use_checkpoint: bool = False,
    use_v2: bool = False,
) -> nn.Module:
    """MONAI ``SwinUNETR``: Swin transformer encoder (submodule ``swinViT``) + CNN decoder.

    Inputs must be divisible by 32 per axis (2³ patches, 4 patch-merging stages): 48³ is not
    allowed, use 64³ or 96³ (32³ leaves a 1³ bottleneck: only with ``norm="batch"`` and
    batches of at least 2).
    """

    del spacing
    _check_divisible(
        to_triple(patch_size, "swin_unetr: patch_size"), 32, "swin_unetr", "2³ patches and 4 merging stages"
    )
    norm = _norm_name(norm, "swin_unetr", ("instance", "batch"))
    if norm == "instance" and max(to_triple(patch_size, "swin_unetr: patch_size")) < 64:
        raise ConfigError(
            f"swin_unetr: patch_size {patch_size!r} leaves a 1x1x1 bottleneck, which instance norm cannot "
            "normalise in training; use a patch of at least 64 along one axis (or norm: batch with batch_size > 1)"
        )
    if int(feature_size) % 12:
        raise ConfigError(f"swin_unetr: feature_size must be a multiple of 12, got {feature_size!r}")
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=int(feature_size),
        depths=tuple(int(d) for d in depths),
        num_heads=tuple(int(h) for h in num_heads),
        window_size=int(window_size),
        norm_name=norm,
        drop_rate=float(drop_rate),
        attn_drop_rate=float(attn_drop_rate),
        dropout_path_rate=float(dropout_path_rate),
        use_checkpoint=bool(use_checkpoint),
        use_v2=bool(use_v2),
    )


def _build_segresnet(
    in_channels: int,
    out_channels: int,
    *,
    patch_size: Sequence[int] | int = (48, 48, 48),
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    init_filters: int = 16,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout_prob: float | None = None,
    num_groups: int = 8,
) -> nn.Module:
    """MONAI ``SegResNet`` (Myronenko 2018, BraTS winner; group norm), stride 2 per level."""

    del spacing
    down = tuple(int(b) for b in blocks_down)
    up = tuple(int(b) for b in blocks_up)
    if len(up) != len(down) - 1:
        raise ConfigError(f"segresnet: blocks_up needs len(blocks_down) - 1 = {len(down) - 1} entries, got {list(up)}")
    _check_divisible(
        to_triple(patch_size, "segresnet: patch_size"),
        2 ** (len(down) - 1),
        "segresnet",
        f"{len(down) - 1} stride-2 levels",
    )
    _check_groups((int(init_filters),), int(num_groups), "segresnet")
    return SegResNet(
        spatial_dims=3,
        init_filters=int(init_filters),
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=dropout_prob,
        num_groups=int(num_groups),
        blocks_down=down,
        blocks_up=up,
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet": _build_unet,
    "resunet": _build_resunet,
    "attention_unet": _build_attention_unet,
    "unetr": _build_unetr,
    "swin_unetr": _build_swin_unetr,
    "segresnet": _build_segresnet,
    # 3D-TransUNet (MONAI blocks + a hand-written query decoder): bratstune.models.transunet
    "transunet_enc": build_transunet_enc,
    "transunet_dec": build_transunet_dec,
}

ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)


def _norm_name(norm: str, arch: str, options: tuple[str, ...]) -> str:
    value = str(norm).lower()
    if value not in options:
        raise ConfigError(f"{arch}: unknown norm '{norm}'{suggest(value, options)}; expected one of {list(options)}")
    return value


def _check_groups(channels: Sequence[int], groups: int, arch: str) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigError(
            f"{arch}: group norm with {groups} groups needs channel counts divisible by {groups}, got {bad}"
        )


def _as_triple(stride: Sequence[int] | int) -> Triple:
    return (stride,) * 3 if isinstance(stride, int) else tuple(stride)  # type: ignore[return-value]


def architecture_options(name: str) -> dict[str, Any]:
    """Keyword options of architecture ``name`` with their defaults."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown architecture '{name}'{suggest(name, _BUILDERS)}; expected one of {list(_BUILDERS)}")
    sig = inspect.signature(builder)
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(name: str, in_channels: int, out_channels: int, **kw: Any) -> nn.Module:
    """Build architecture ``name`` from MONAI with BraTS defaults.

    Args:
        name: one of :data:`ARCHITECTURES` (``unet``, ``resunet``, ``attention_unet``,
            ``unetr``, ``swin_unetr``, ``segresnet``, ``transunet_enc``, ``transunet_dec``).
        in_channels: input channels (4 for t1n, t1c, t2w, t2f).
        out_channels: output channels (3 regions WT/TC/ET, or labels incl. background).
        **kw: architecture options (see :func:`architecture_options`), plus the common
            ``patch_size`` and ``spacing``.

    Returns:
        The MONAI module, with ``bratstune_arch`` set to ``name``. Input ``(B, in_channels,
        X, Y, Z)``; output ``(B, out_channels, X, Y, Z)`` logits (``unet`` and ``transunet_enc``
        with deep supervision: ``(B, S, out_channels, X, Y, Z)`` in training mode;
        ``transunet_dec`` in training mode: the query set of :mod:`bratstune.models.transunet`).

    Raises:
        ConfigError: unknown architecture or option (with the nearest valid name), bad value.
    """
    options = architecture_options(name)
    for key in kw:
        if key not in options:
            raise ConfigError(
                f"{name}: unknown option '{key}'{suggest(key, options)}; valid options: {sorted(options)}"
            )
    for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: {what} must be a positive integer, got {value!r}")
    try:
        model = _BUILDERS[name](in_channels, out_channels, **kw)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: MONAI rejected the options {kw}: {exc}") from exc
    model.bratstune_arch = name  # type: ignore[assignment]
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built %s (%d parameters) with %s", name, n_params, kw)
    return model


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
