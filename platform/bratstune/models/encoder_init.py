"""Initialise a segmenter's encoder from pre-trained weights, with an exact account of every tensor.

``init: {encoder_from: SOURCE}`` in a training config ends up here
(:func:`bratstune.training.network.prepare_network`). ``SOURCE`` is one of

* ``models:/bratstune-mae-encoder@latest`` (or ``models:/NAME/3``, ``models:/NAME@alias``):
  a registered MAE encoder (``latest`` is MLflow's built-in alias for the newest version);
* ``runs:/<run id>/encoder`` or a bare 32-hex MLflow run id (its ``encoder/`` artifacts);
* a file (``encoder.pt``, any state dict or ``{"model": state_dict}``) or a folder holding one.

MLflow sources (the first two) are downloaded at the edge, before training, by
:func:`bratstune.tracking.artifacts.localise_config` (which checks a registered encoder against
the digest recorded at registration); this module only reads local files. A folder that is a
package (an export of :func:`bratstune.pretrain.export.save_encoder` or a registered model: it
holds ``manifest.json``, ``encoder.json`` or ``MLmodel``) is verified against its manifest before
any file of it is read (:func:`bratstune.integrity.verify_manifest`); an export without a
manifest (an old one) is refused. Weights are read with ``torch.load(weights_only=True)``.

Matching (:func:`load_encoder_weights`): a tensor of the file is loaded when the model has a
tensor of the same name (after ``strip_prefix``; an exported encoder's ``vit.`` prefix is
re-targeted to the model's ``encoder`` group when that is a single module) and the same shape.
A position embedding ``(1, N, D)`` whose patch grid differs (the MAE was trained on another
crop size) is **trilinearly interpolated** to the model's grid; any other shape difference is
**mismatched** and skipped. The :class:`EncoderInitReport` lists loaded, interpolated,
mismatched, unexpected (in the file, not in the model) and missing (encoder tensors of the
model the file did not provide) tensors; nothing is dropped silently. MONAI
``MaskedAutoEncoderViT`` state dicts are mapped explicitly (``patch_embedding.*`` and
``blocks.<i>`` -> ``vit.*``, its final ``blocks.<L>`` LayerNorm -> ``vit.norm``; decoder,
class and mask tokens reported as unexpected).

``transunet_enc`` (3D-TransUNet, encoder-only): the MAE's ViT goes into the network's
``transformer.vit`` (its ``middle`` group, the transformer on the CNN's deepest feature map):
``vit.blocks.*`` and ``vit.norm.*`` map to ``transformer.vit.blocks.*`` / ``transformer.vit.norm.*``.
Its patch embedding (a 16³ convolution of the 4 modalities + position embeddings of the image's
patch grid) differs from the TransUNet's (a 1x1x1 convolution of CNN features on the bottleneck
grid), so ``vit.patch_embedding.*`` is **skipped** (listed in the report), as in the paper, and so
are MONAI's unused ``norm_cross_attn`` LayerNorms. The report's ``encoder_tensors`` are then the
tensors an MAE provides: the ViT blocks and final norm.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError, DataError
from bratstune.integrity import MANIFEST_FILE, verify_manifest
from bratstune.models import architecture_of, layer_groups

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAE_SOURCE",
    "ENCODER_INIT_CHOICES",
    "EncoderInitReport",
    "encoder_init_overrides",
    "interpolate_pos_embed",
    "load_encoder_weights",
    "map_mae_to_transunet",
    "read_encoder",
    "resolve_encoder_source",
]

DEFAULT_MAE_SOURCE = "models:/bratstune-mae-encoder@latest"
#: search-space choice -> ``init.encoder_from``
ENCODER_INIT_CHOICES: dict[str, str | None] = {"scratch": None, "mae": DEFAULT_MAE_SOURCE}
_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
_RUN_ID = re.compile(r"[0-9a-f]{32}")

Shape = tuple[int, ...]


@dataclass
class EncoderInitReport:
    """What :func:`load_encoder_weights` did with every tensor.

    Attributes:
        source: ``init.encoder_from`` as given.
        file: the local weights file it resolved to.
        loaded: model tensor names loaded unchanged.
        interpolated: ``(name, file shape, model shape)`` of position embeddings resampled to
            the model's patch grid.
        mismatched: ``(name, file shape, model shape)`` skipped because the shapes differ.
        unexpected: file tensors with no model tensor of that name (skipped).
        missing: tensors of the model's ``encoder`` group the file did not provide at all
            (left as initialised; mismatched ones are listed under ``mismatched`` only).
        encoder_tensors: every tensor name of the model's ``encoder`` group (``transunet_enc``:
            its ViT blocks and final norm).
        skipped: file tensors deliberately not loaded (``transunet_enc``: the MAE's patch
            embedding and unused ``norm_cross_attn`` tensors).
    """

    source: str
    file: Path
    loaded: list[str] = field(default_factory=list)
    interpolated: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    encoder_tensors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def initialised(self) -> list[str]:
        """Model tensors that received weights (loaded or interpolated)."""
        return self.loaded + [name for name, _, _ in self.interpolated]

    @property
    def complete(self) -> bool:
        """Every encoder tensor was initialised from the file."""
        done = set(self.initialised)
        return bool(self.encoder_tensors) and all(name in done for name in self.encoder_tensors)

    def summary(self) -> str:
        enc = set(self.encoder_tensors)
        in_encoder = sum(1 for n in self.initialised if n in enc)
        text = (
            f"init from {self.source}: {len(self.loaded)} tensors loaded, {len(self.interpolated)} interpolated, "
            f"{len(self.mismatched)} shape-mismatched (skipped), {len(self.unexpected)} unexpected (skipped), "
            f"{len(self.missing)} encoder tensors missing; encoder {in_encoder}/{len(enc)} initialised"
        )
        if self.skipped:
            text += f"\n  skipped (not transferable): {len(self.skipped)} tensors, e.g. {', '.join(self.skipped[:3])}"
        for name, old, new in self.interpolated:
            text += f"\n  interpolated {name}: {list(old)} -> {list(new)}"
        for name, old, new in self.mismatched:
            text += f"\n  mismatched {name}: file {list(old)} vs model {list(new)}"
        if self.missing:
            text += f"\n  missing: {', '.join(self.missing[:8])}{' ...' if len(self.missing) > 8 else ''}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "file": str(self.file),
            "loaded": list(self.loaded),
            "interpolated": [[n, list(a), list(b)] for n, a, b in self.interpolated],
            "mismatched": [[n, list(a), list(b)] for n, a, b in self.mismatched],
            "unexpected": list(self.unexpected),
            "missing": list(self.missing),
            "skipped": list(self.skipped),
            "encoder_tensors": len(self.encoder_tensors),
            "complete": self.complete,
        }


def encoder_init_overrides(
    choice: str, *, source: str = DEFAULT_MAE_SOURCE, freeze_encoder: bool = False
) -> dict[str, Any]:
    """Train-config overrides for a search-space choice ``scratch`` | ``mae`` (+ frozen encoder).

    Returns:
        e.g. ``{"init.encoder_from": "models:/bratstune-mae-encoder@latest", "freeze": ["encoder"]}``.
    """

    check_choice(choice, ENCODER_INIT_CHOICES, "encoder_init")
    out: dict[str, Any] = {"init.encoder_from": None if choice == "scratch" else source}
    out["freeze"] = ["encoder"] if freeze_encoder and choice != "scratch" else []
    return out


# -- finding the file ---------------------------------------------------------------------------


_PACKAGE_MARKERS = (MANIFEST_FILE, "encoder.json", "MLmodel")


def _verify_package(folder: Path) -> None:
    """Verify ``folder`` against its manifest when it is a model package (see the module docstring)."""
    if any((folder / marker).is_file() for marker in _PACKAGE_MARKERS):
        verify_manifest(folder)


def _find_weights(path: Path, source: str) -> Path:
    if path.is_file():
        _verify_package(path.parent)
        return path
    _verify_package(path)
    for name in ("encoder.pt", "model.pt"):
        hits = sorted(path.rglob(name))
        if hits:
            return hits[0]
    hits = sorted(p for p in path.rglob("*") if p.suffix in (".pt", ".pth") and p.is_file())
    if len(hits) == 1:
        return hits[0]
    raise DataError(
        path,
        f"init.encoder_from {source!r}: no encoder.pt here"
        + (f" (several weight files: {[h.name for h in hits]})" if hits else ""),
    )


def resolve_encoder_source(source: str | Path) -> Path:
    """The local weights file of ``source`` (a ``.pt`` file, or a folder holding ``encoder.pt``).

    MLflow URIs and run ids are resolved to local folders at the edge, before training
    (:func:`bratstune.tracking.artifacts.localise_config`); this layer never downloads.

    Raises:
        DataError: a URI that was not resolved, or nothing found under that name.
    """
    text = str(source)
    if text.startswith(_MLFLOW_SCHEMES) or _RUN_ID.fullmatch(text):
        raise DataError(
            text,
            "init.encoder_from: an MLflow source must be downloaded before training "
            "(bratstune.tracking.artifacts.localise_config does it for every job and command)",
        )
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(path, "init.encoder_from: no such file, folder, MLflow run id or models:/ / runs:/ URI")
    return _find_weights(path, text)


# -- reading and mapping ------------------------------------------------------------------------


def _from_monai_mae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a MONAI ``MaskedAutoEncoderViT`` state dict to UNETR's ``vit.*`` names."""
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers or "decoder_pred.weight" not in state:
        return state
    norm_index = layers[-1]
    if not {f"blocks.{norm_index}.weight", f"blocks.{norm_index}.bias"} <= set(state) or any(
        k.startswith(f"blocks.{norm_index}.") and k.count(".") > 2 for k in state
    ):
        return state
    out = {}
    for key, tensor in state.items():
        if key.startswith("patch_embedding."):
            out["vit." + key] = tensor
        elif key.startswith(f"blocks.{norm_index}."):
            out["vit.norm." + key.split(".", 2)[2]] = tensor
        elif key.startswith("blocks."):
            out["vit." + key] = tensor
        else:
            out[key] = tensor  # decoder_*, cls_token, mask_tokens: reported as unexpected
    logger.info("mapped a MONAI MaskedAutoEncoderViT state dict (%d blocks, norm = blocks.%d)", norm_index, norm_index)
    return out


def read_encoder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state_dict, meta)`` of a weights file (``meta`` only for exported MAE encoders)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise DataError(path, f"init.encoder_from: not a readable weights file ({exc})") from None
    meta = None
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        meta = payload.get("meta") if isinstance(payload.get("meta"), Mapping) else None
        payload = payload["state_dict"]
    elif isinstance(payload, Mapping) and isinstance(payload.get("model"), Mapping):
        payload = payload["model"]
    if not isinstance(payload, Mapping) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise DataError(path, "init.encoder_from: expected a state dict of tensors (or {'model': state_dict})")
    return _from_monai_mae(dict(payload)), dict(meta) if meta else None


#: architectures whose MAE-initialisable ViT is not the ``encoder`` group -> its module prefix
_MAE_TARGETS = {"transunet_enc": "transformer.vit."}


def _mae_target(model: torch.nn.Module) -> str | None:
    try:
        return _MAE_TARGETS.get(architecture_of(model))
    except ConfigError:
        return None


def _not_transferred(key: str) -> bool:
    """MAE ViT tensors a ``transunet_enc`` does not take: patch embedding, unused cross-attention norms."""
    return key.startswith("patch_embedding.") or ".norm_cross_attn." in key


def map_mae_to_transunet(
    state: Mapping[str, torch.Tensor], src_prefix: str, target: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """MAE encoder keys (``vit.blocks.*``, ``vit.norm.*``) -> ``target`` (e.g. ``transformer.vit.``).

    Returns:
        ``(mapped, skipped)``: the re-targeted state dict (keys outside ``src_prefix`` unchanged,
        so they are reported as unexpected) and the skipped keys (:func:`_not_transferred`).
    """
    mapped: dict[str, torch.Tensor] = {}
    skipped = []
    for key, tensor in state.items():
        if not key.startswith(src_prefix):
            mapped[key] = tensor
        elif _not_transferred(key[len(src_prefix) :]):
            skipped.append(key)
        else:
            mapped[target + key[len(src_prefix) :]] = tensor
    return mapped, skipped


def _cube_grid(n: int) -> tuple[int, int, int] | None:
    side = round(n ** (1.0 / 3.0))
    return (side, side, side) if side**3 == n else None


def interpolate_pos_embed(pos: torch.Tensor, src_grid: tuple[int, ...], dst_grid: tuple[int, ...]) -> torch.Tensor:
    """Trilinearly resample ``(1, gx*gy*gz, D)`` position embeddings from ``src_grid`` to ``dst_grid``."""
    if pos.ndim != 3 or pos.shape[1] != math.prod(src_grid):
        raise ValueError(f"expected (1, {math.prod(src_grid)}, D) for grid {src_grid}, got {tuple(pos.shape)}")
    d = pos.shape[-1]
    grid = pos.reshape(pos.shape[0], *src_grid, d).permute(0, 4, 1, 2, 3).float()
    grid = F.interpolate(grid, size=tuple(dst_grid), mode="trilinear", align_corners=False)
    return grid.permute(0, 2, 3, 4, 1).reshape(pos.shape[0], math.prod(dst_grid), d).to(pos.dtype)


def _model_grid(model: torch.nn.Module, n: int) -> tuple[int, int, int] | None:
    feat = getattr(model, "feat_size", None)  # UNETR
    if feat is not None and math.prod(feat) == n:
        return tuple(int(v) for v in feat)  # type: ignore[return-value]
    return _cube_grid(n)


def _encoder_prefixes(model: torch.nn.Module) -> list[str]:

    try:
        return list(layer_groups(model)["encoder"])
    except (ConfigError, KeyError):
        return []


def load_encoder_weights(
    model: torch.nn.Module,
    source: str | Path,
    *,
    strip_prefix: str = "",
    interpolate: bool = True,
    require_complete: bool = False,
) -> EncoderInitReport:
    """Load ``source``'s matching tensors into ``model`` (see the module docstring).

    Args:
        model: the segmenter (e.g. ``build_model("unetr", 4, 3, ...)``).
        source: a weights file or a folder (URIs are resolved before, at the edge).
        strip_prefix: removed from the file's keys before matching (e.g. ``"encoder."``).
        interpolate: resample position embeddings to the model's patch grid (else mismatched).
        require_complete: raise unless every ``encoder`` tensor of the model was initialised.

    Returns:
        :class:`EncoderInitReport`.

    Raises:
        DataError: source not found/readable, no tensor matches, or (``require_complete``) an
            encoder tensor was left uninitialised.
    """
    path = resolve_encoder_source(source)
    state, meta = read_encoder(path)
    if strip_prefix:
        state = {(k[len(strip_prefix) :] if k.startswith(strip_prefix) else k): v for k, v in state.items()}
    own = model.state_dict()
    prefixes = _encoder_prefixes(model)
    report = EncoderInitReport(
        source=str(source),
        file=path,
        encoder_tensors=[k for k in own if any(k == p or k.startswith(p + ".") for p in prefixes)],
    )
    src_prefix = (meta or {}).get("prefix") or "vit."
    target = _mae_target(model)
    if target is not None:
        state, report.skipped = map_mae_to_transunet(state, src_prefix, target)
        report.encoder_tensors = [k for k in own if k.startswith(target) and not _not_transferred(k[len(target) :])]
    matched: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        if name not in own and len(prefixes) == 1 and key.startswith(src_prefix):
            name = f"{prefixes[0]}.{key[len(src_prefix) :]}"
        if name not in own:
            report.unexpected.append(key)
            continue
        target = own[name]
        if tuple(target.shape) == tuple(tensor.shape):
            matched[name] = tensor
            report.loaded.append(name)
            continue
        src_grid = tuple((meta or {}).get("grid") or ()) or _cube_grid(tensor.shape[1]) if tensor.ndim == 3 else None
        dst_grid = _model_grid(model, target.shape[1]) if target.ndim == 3 else None
        if (
            interpolate
            and name.endswith("position_embeddings")
            and src_grid
            and dst_grid
            and tensor.shape[0] == target.shape[0]
            and tensor.shape[-1] == target.shape[-1]
            and math.prod(src_grid) == tensor.shape[1]
        ):
            matched[name] = interpolate_pos_embed(tensor, src_grid, dst_grid)
            report.interpolated.append((name, tuple(tensor.shape), tuple(target.shape)))
            logger.warning(
                "%s: position embeddings interpolated from grid %s to %s", name, list(src_grid), list(dst_grid)
            )
        else:
            report.mismatched.append((name, tuple(tensor.shape), tuple(target.shape)))
            logger.warning(
                "%s: shape %s in %s vs %s in the model; skipped", name, list(tensor.shape), path, list(target.shape)
            )
    skipped = {name for name, _, _ in report.mismatched}
    report.missing = [k for k in report.encoder_tensors if k not in matched and k not in skipped]
    if not matched:
        raise DataError(
            path,
            "init.encoder_from: no tensor matches the model (check init.strip_prefix and the "
            f"architecture; file keys look like {list(state)[:3]})",
        )
    if require_complete and not report.complete:
        raise DataError(
            path, "init.encoder_from: encoder not fully initialised (init.require_complete):\n" + report.summary()
        )
    model.load_state_dict(matched, strict=False)
    logger.info(report.summary())
    return report
