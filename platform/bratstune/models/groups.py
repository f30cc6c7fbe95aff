"""Named layer groups — ``encoder``, ``middle``, ``decoder``, ``head`` — for every architecture.

A group is a list of module-name prefixes (as in ``model.named_parameters()``); a parameter
belongs to the group with a prefix equal to its module path or an ancestor of it. Every
parameter of every supported architecture belongs to exactly one group
(:func:`parameter_groups` checks it).

Group definitions (MONAI module names):

* ``unet`` (DynUNet): encoder ``input_block``, ``downsamples``; middle ``bottleneck``;
  decoder ``upsamples``; head ``output_block``, ``deep_supervision_heads``.
* ``resunet`` (UNet, nested ``model.1.submodule...``): encoder the down path of every level;
  middle the deepest unit; decoder the up path of every level except the top one's final
  residual unit, which is the head (with ``num_res_units=0`` the whole top up-layer).
* ``attention_unet``: encoder the input ConvBlock ``model.0`` and every level's down ConvBlock;
  middle the deepest ConvBlock; decoder every level's ``attention``, ``upconv``, ``merge``;
  head the final 1x1 convolution ``model.2``.
* ``unetr``: encoder ``vit``; middle ``decoder5``; decoder ``encoder1..4``, ``decoder4..2``;
  head ``out``.
* ``swin_unetr``: encoder ``swinViT``; middle ``encoder10``; decoder ``encoder1..4``,
  ``decoder5..1``; head ``out``.
* ``segresnet``: encoder ``convInit``, ``down_layers.0..n-2``; middle ``down_layers.n-1``;
  decoder ``up_samples``, ``up_layers``; head ``conv_final``.
* ``transunet_enc``: encoder ``encoder`` (every CNN level, the deepest included); middle
  ``transformer`` (the ViT: token projection, position embeddings, blocks, norm, projection
  back); decoder ``decoder``; head ``out``, ``ds_heads``.
* ``transunet_dec``: encoder ``encoder``; middle ``query_decoder`` (the transformer: queries,
  feature projections, level embeddings, layers); decoder ``decoder`` (the CNN decoder); head
  ``query_head`` (class and mask-embedding heads).

For the transformer networks ``encoder`` is exactly the transformer (``vit`` / ``swinViT``):
the MAE / self-supervised pre-training exports it, and ``freeze(model, ["encoder"])`` after
loading must freeze exactly the loaded weights. MONAI's ``encoder1..4`` blocks there are CNN
skip projections trained from scratch, so they belong to ``decoder``. For UNETR the middle is
``decoder5``, the block that upsamples the ViT's last hidden state (the bottleneck) — UNETR
has no separate bottleneck block. The 3D-TransUNet is a CNN whose transformer sits in the
middle: there the transformer is ``middle`` (an MAE initialises ``transunet_enc``'s ViT blocks,
so ``freeze: [middle]`` keeps the pre-trained weights).
"""

from __future__ import annotations

from collections.abc import Iterable

from monai.networks.blocks import ResidualUnit
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNETR, AttentionUnet, DynUNet, SegResNet, SwinUNETR, UNet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import nn

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError
from bratstune.models.transunet import TransUNetDecoderOnly, TransUNetEncoderOnly

__all__ = ["GROUPS", "architecture_of", "check_group_names", "group_of", "layer_groups", "parameter_groups"]

GROUPS: tuple[str, ...] = ("encoder", "middle", "decoder", "head")

Groups = dict[str, list[str]]


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """Strip DDP/DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``) wrappers."""
    prefix = ""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model, prefix = model.module, prefix + "module."
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model, prefix = model._orig_mod, prefix + "_orig_mod."  # type: ignore[assignment]
        else:
            return model, prefix


def architecture_of(model: nn.Module) -> str:
    """Architecture name of a model from :func:`build_model` (or a bare MONAI network)."""
    inner, _ = _unwrap(model)
    name = getattr(inner, "bratstune_arch", None)
    if isinstance(name, str):
        return name

    for cls, arch in (
        (DynUNet, "unet"),
        (AttentionUnet, "attention_unet"),
        (UNet, "resunet"),
        (UNETR, "unetr"),
        (SwinUNETR, "swin_unetr"),
        (SegResNet, "segresnet"),
        (TransUNetEncoderOnly, "transunet_enc"),
        (TransUNetDecoderOnly, "transunet_dec"),
    ):
        if isinstance(inner, cls):
            return arch
    raise ConfigError(
        f"no layer groups known for {type(inner).__name__}; build the model with bratstune.models.build_model"
    )


def _dynunet(model: nn.Module) -> Groups:
    head = ["output_block"]
    if getattr(model, "deep_supervision", False):
        head.append("deep_supervision_heads")
    return {
        "encoder": ["input_block", "downsamples"],
        "middle": ["bottleneck"],
        "decoder": ["upsamples"],
        "head": head,
    }


def _monai_unet(model: nn.Module) -> Groups:

    def is_level(block: nn.Module) -> bool:
        return isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection)

    groups: Groups = {g: [] for g in GROUPS}
    prefix, block, top = "model", model.model, True
    while True:
        if not is_level(block):  # bottom unit
            groups["middle"].append(prefix)
            break
        groups["encoder"].append(f"{prefix}.0")
        up = block[2]
        if top and isinstance(up, nn.Sequential) and len(up) == 2 and isinstance(up[1], ResidualUnit):
            groups["decoder"].append(f"{prefix}.2.0")
            groups["head"].append(f"{prefix}.2.1")
        elif top:  # num_res_units == 0: the top up-convolution produces the output
            groups["head"].append(f"{prefix}.2")
        else:
            groups["decoder"].append(f"{prefix}.2")
        prefix, block, top = f"{prefix}.1.submodule", block[1].submodule, False
    return groups


def _attention_unet(model: nn.Module) -> Groups:

    groups: Groups = {"encoder": ["model.0"], "middle": [], "decoder": [], "head": ["model.2"]}
    prefix, layer = "model.1", model.model[1]
    while isinstance(layer, AttentionLayer):
        groups["decoder"] += [f"{prefix}.attention", f"{prefix}.upconv", f"{prefix}.merge"]
        sub = layer.submodule
        if isinstance(sub, nn.Sequential) and len(sub) == 2 and isinstance(sub[1], AttentionLayer):
            groups["encoder"].append(f"{prefix}.submodule.0")
            prefix, layer = f"{prefix}.submodule.1", sub[1]
        else:
            groups["middle"].append(f"{prefix}.submodule")
            break
    return groups


def _unetr(model: nn.Module) -> Groups:
    return {
        "encoder": ["vit"],
        "middle": ["decoder5"],
        "decoder": ["encoder1", "encoder2", "encoder3", "encoder4", "decoder4", "decoder3", "decoder2"],
        "head": ["out"],
    }


def _swin_unetr(model: nn.Module) -> Groups:
    return {
        "encoder": ["swinViT"],
        "middle": ["encoder10"],
        "decoder": [
            "encoder1",
            "encoder2",
            "encoder3",
            "encoder4",
            "decoder5",
            "decoder4",
            "decoder3",
            "decoder2",
            "decoder1",
        ],
        "head": ["out"],
    }


def _segresnet(model: nn.Module) -> Groups:
    n = len(model.down_layers)
    return {
        "encoder": ["convInit"] + [f"down_layers.{i}" for i in range(n - 1)],
        "middle": [f"down_layers.{n - 1}"],
        "decoder": ["up_samples", "up_layers"],
        "head": ["conv_final"],
    }


def _transunet_enc(model: nn.Module) -> Groups:
    return {
        "encoder": ["encoder"],
        "middle": ["transformer"],
        "decoder": ["decoder"],
        "head": ["out", "ds_heads"] if getattr(model, "deep_supervision", False) else ["out"],
    }


def _transunet_dec(model: nn.Module) -> Groups:
    return {"encoder": ["encoder"], "middle": ["query_decoder"], "decoder": ["decoder"], "head": ["query_head"]}


_GROUP_FNS = {
    "unet": _dynunet,
    "resunet": _monai_unet,
    "attention_unet": _attention_unet,
    "unetr": _unetr,
    "swin_unetr": _swin_unetr,
    "segresnet": _segresnet,
    "transunet_enc": _transunet_enc,
    "transunet_dec": _transunet_dec,
}


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Module-name prefixes of each group: ``{"encoder": [...], "middle": [...], "decoder": [...], "head": [...]}``.

    Prefixes are relative to ``model`` as given (a DDP wrapper adds ``module.``).
    """
    inner, wrap = _unwrap(model)
    groups = _GROUP_FNS[architecture_of(model)](inner)
    return {g: [wrap + p for p in groups[g]] for g in GROUPS}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group_of(name: str, groups: dict[str, list[str]]) -> str | None:
    """The group whose prefixes contain parameter/module ``name`` (``None`` if none)."""
    for group, prefixes in groups.items():
        if any(_matches(name, p) for p in prefixes):
            return group
    return None


def check_group_names(names: Iterable[str]) -> list[str]:
    """Validate group names (``ConfigError`` with a suggestion) and return them as a list."""
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        if name not in GROUPS:
            raise ConfigError(f"unknown layer group '{name}'{suggest(name, GROUPS)}; expected one of {list(GROUPS)}")
        out.append(name)
    return out


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names per group; raises ``ConfigError`` if a parameter is in no group or in two."""
    groups = layer_groups(model)
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _ in model.named_parameters():
        owners = [g for g, prefixes in groups.items() if any(_matches(name, p) for p in prefixes)]
        if len(owners) != 1:
            raise ConfigError(
                f"parameter '{name}' of {architecture_of(model)} belongs to {len(owners)} layer groups "
                f"({owners}); the group definitions in bratstune.models.groups need updating"
            )
        out[owners[0]].append(name)
    return out
