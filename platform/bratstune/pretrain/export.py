"""What MAE pre-training leaves behind: the encoder file, its registry entry, a reconstruction picture.

* :func:`save_encoder` writes ``encoder.pt`` (``{"state_dict": {vit.*: tensor}, "meta": {...}}``,
  loadable with ``torch.load(weights_only=True)``), ``encoder.json`` (the meta: patch grid,
  sizes, modalities) and ``manifest.json`` (SHA-256 of every file of the folder,
  :mod:`bratstune.integrity`) into a folder; readers verify the folder before loading it.
* :func:`register_encoder` registers the folder as an MLflow *models-from-code* pyfunc model
  (:class:`MaeEncoderModel`: ``predict`` maps ``(B, C, X, Y, Z)`` volumes to mean-pooled encoder
  features ``(B, D)``; nothing is pickled) under the run, with the package digest recorded on the
  version (:func:`bratstune.tracking.model_package.register_package`; default name
  ``bratstune-mae-encoder``). ``models:/NAME@latest`` then resolves to the newest version:
  ``latest`` is MLflow's built-in alias (it refuses to set it by hand); an extra alias (e.g.
  ``candidate``) can be set.
* :func:`reconstruction_figure`: PNG of one axial slice per modality shown: input, masked input,
  reconstruction (visible patches from the input, masked ones predicted; de-normalised with the
  target patch's mean/std when the loss used normalised targets). Drawn into an export folder,
  the folder's manifest is renewed to list it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from monai.networks.nets.vit import ViT

from bratstune.data.case import MODALITIES
from bratstune.integrity import MANIFEST_FILE, verify_manifest, write_manifest
from bratstune.pretrain.model import (
    MaskedAutoencoder3D,
    encoder_meta,
    encoder_state_dict,
    normalise_patches,
    patchify,
    random_noise,
    unpatchify,
)
from bratstune.tracking.model_package import register_package
from bratstune.tracking.runs import package_versions

logger = logging.getLogger(__name__)

__all__ = [
    "ENCODER_FILE",
    "META_FILE",
    "REGISTERED_NAME",
    "MaeEncoderModel",
    "reconstruction_figure",
    "register_encoder",
    "save_encoder",
]

ENCODER_FILE = "encoder.pt"
META_FILE = "encoder.json"
REGISTERED_NAME = "bratstune-mae-encoder"
MODEL_CLASS = "bratstune.pretrain.export:MaeEncoderModel"  # what the verified entry loads
#: what importing the shipped ``bratstune.pretrain.export`` needs
REQUIREMENTS = ("torch", "monai", "numpy", "nibabel", "safetensors", "scipy", "pyyaml", "mlflow", "pandas")


def save_encoder(model: MaskedAutoencoder3D, folder: Path, **extra_meta: Any) -> Path:
    """Write ``encoder.pt`` + ``encoder.json`` into ``folder``; returns the ``encoder.pt`` path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = encoder_meta(model.config, **extra_meta)
    state = encoder_state_dict(model)
    meta["tensors"] = len(state)
    tmp = folder / f".{ENCODER_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    torch.save({"state_dict": state, "meta": meta}, tmp)
    tmp.replace(folder / ENCODER_FILE)
    tmp = folder / f".{META_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(folder / META_FILE)
    write_manifest(folder)
    return folder / ENCODER_FILE


class MaeEncoderModel(mlflow.pyfunc.PythonModel):
    """The registered encoder's pyfunc model: ``(B, C, X, Y, Z)`` volumes -> mean-pooled features ``(B, D)``.

    Loaded by the verified entry (:mod:`bratstune.integrity`) once the package matched its
    recorded digest; reads ``encoder.pt`` with ``torch.load(weights_only=True)``.
    """

    def load_context(self, context):  # MLflow hook
        payload = torch.load(context.artifacts["encoder"], map_location="cpu", weights_only=True)
        meta = payload["meta"]
        self.vit = ViT(
            in_channels=meta["in_channels"],
            img_size=meta["img_size"],
            patch_size=meta["patch_size"],
            hidden_size=meta["hidden_size"],
            mlp_dim=meta["mlp_dim"],
            num_layers=meta["num_layers"],
            num_heads=meta["num_heads"],
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
        )
        prefix = meta["prefix"]
        self.vit.load_state_dict({k[len(prefix) :]: v for k, v in payload["state_dict"].items()})
        self.vit.eval()

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            tokens, _ = self.vit(x)
        return tokens.mean(dim=1).numpy()


def register_encoder(
    folder: Path,
    *,
    run_id: str,
    name: str = REGISTERED_NAME,
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Log ``folder``'s encoder as a pyfunc model of run ``run_id`` and register it as ``name``.

    Returns:
        ``(version, "models:/NAME/VERSION")``.
    """

    folder = Path(folder)
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"register_encoder must run inside MLflow run {run_id}")
    verify_manifest(folder)  # what is registered is what save_encoder wrote
    mv = register_package(
        name=name,
        artifact_name="mae_encoder",
        model_class=MODEL_CLASS,
        artifacts={"encoder": folder / ENCODER_FILE, "meta": folder / META_FILE},
        pip_requirements=[f"{k}=={v}" for k, v in package_versions(REQUIREMENTS).items()],
        tags=tags,
    )
    version = str(mv.version)
    client = MlflowClient()
    if alias and alias.lower() != "latest":
        client.set_registered_model_alias(name, alias, version)
    logger.info(
        "registered %s version %s (models:/%s@latest)%s", name, version, name, f", alias {alias}" if alias else ""
    )
    return version, f"models:/{name}/{version}"


def _fit_to(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Centre crop / zero-pad ``(C, X, Y, Z)`` to ``size``."""
    out = np.asarray(image, dtype=np.float32)
    for axis, want in enumerate(size, start=1):
        have = out.shape[axis]
        if have > want:
            start = (have - want) // 2
            out = np.take(out, range(start, start + want), axis=axis)
        elif have < want:
            pad = [(0, 0)] * out.ndim
            pad[axis] = ((want - have) // 2, want - have - (want - have) // 2)
            out = np.pad(out, pad)
    return out


def reconstruction_figure(
    model: MaskedAutoencoder3D,
    image: np.ndarray,
    path: Path,
    *,
    seed: int = 0,
    channels: Sequence[int] = (1, 3),
    title: str = "",
) -> dict[str, float]:
    """Save the input / masked / reconstruction PNG of the middle axial slice.

    Args:
        model: trained MAE (CPU).
        image: one preprocessed volume ``(C, X, Y, Z)``; centre-cropped/padded to ``img_size``.
        path: PNG to write.
        seed: masking noise.
        channels: modality indices shown, one row each (default t1c, t2f).
        title: figure title prefix.

    Returns:
        ``{"recon/mse_masked": ..., "recon/mask_ratio": ...}`` (MSE in the input's intensity units).
    """
    # Deferred: matplotlib is needed only to draw this figure.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = model.config
    x = torch.from_numpy(_fit_to(image, cfg.img_size))[None]
    noise = random_noise(np.random.default_rng(seed), 1, cfg.num_tokens)
    model = model.eval()
    with torch.no_grad():
        pred, mask = model(x, noise)
    target = patchify(x, cfg.patch_size)
    if cfg.norm_pix_loss:
        _, mean, std = normalise_patches(target)
        pred = pred * std + mean
    m = mask[..., None]
    recon = unpatchify(torch.where(m, pred, target), cfg.patch_size, cfg.grid, cfg.in_channels)[0].numpy()
    hidden = unpatchify(m.expand_as(target).float(), cfg.patch_size, cfg.grid, cfg.in_channels)[0].numpy() > 0.5
    mse = float(((pred - target) ** 2).mean(dim=-1)[mask].mean())
    inp = x[0].numpy()
    z = inp.shape[-1] // 2
    rows = [c for c in channels if c < cfg.in_channels] or [0]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, c in enumerate(rows):
        lo, hi = np.percentile(inp[c], [1, 99]) if np.ptp(inp[c]) > 0 else (0.0, 1.0)
        masked = np.ma.masked_array(inp[c, :, :, z], mask=hidden[c, :, :, z])
        cmap = plt.get_cmap("gray").copy()
        cmap.set_bad("tab:blue")
        name = MODALITIES[c] if c < len(MODALITIES) else f"channel {c}"
        for col, (img, label) in enumerate(
            (
                (inp[c, :, :, z], "input"),
                (masked, f"masked ({cfg.mask_ratio:.0%} hidden)"),
                (recon[c, :, :, z], "reconstruction"),
            )
        ):
            ax = axes[r][col]
            ax.imshow(np.ma.asarray(img).T, cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.axis("off")
    fig.suptitle(f"{title}MAE reconstruction, axial slice {z}; masked-patch MSE {mse:.3f}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if (path.parent / MANIFEST_FILE).is_file():  # drawn into an export folder: it stays complete
        write_manifest(path.parent)
    return {"recon/mse_masked": mse, "recon/mask_ratio": float(mask.float().mean())}
