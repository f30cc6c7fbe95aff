"""What MAE pre-training leaves behind: the encoder file, its registry entry, a reconstruction picture.

* :func:`save_encoder` writes ``encoder.pt`` (``{"state_dict": {vit.*: tensor}, "meta": {...}}``,
  loadable with ``torch.load(weights_only=True)``) and ``encoder.json`` (the meta: patch grid,
  sizes, modalities) into a folder.
* :func:`register_encoder` logs the folder as an MLflow pyfunc model (``predict`` maps
  ``(B, C, X, Y, Z)`` volumes to mean-pooled encoder features ``(B, D)``) under the run and
  registers it (default name ``bratstune-mae-encoder``). ``models:/NAME@latest`` then resolves
  to the newest version: ``latest`` is MLflow's built-in alias (it refuses to set it by hand);
  an extra alias (e.g. ``candidate``) can be set.
* :func:`reconstruction_figure`: PNG of one axial slice per modality shown: input, masked input,
  reconstruction (visible patches from the input, masked ones predicted; de-normalised with the
  target patch's mean/std when the loss used normalised targets).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import monai
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from monai.networks.nets.vit import ViT

from bratstune.data.case import MODALITIES
from bratstune.pretrain.model import (
    MaskedAutoencoder3D,
    encoder_meta,
    encoder_state_dict,
    normalise_patches,
    patchify,
    random_noise,
    unpatchify,
)

logger = logging.getLogger(__name__)

__all__ = ["ENCODER_FILE", "META_FILE", "REGISTERED_NAME", "register_encoder", "reconstruction_figure", "save_encoder"]

ENCODER_FILE = "encoder.pt"
META_FILE = "encoder.json"
REGISTERED_NAME = "bratstune-mae-encoder"


def save_encoder(model: MaskedAutoencoder3D, folder: Path, **extra_meta: Any) -> Path:
    """Write ``encoder.pt`` + ``encoder.json`` into ``folder``; returns the ``encoder.pt`` path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = encoder_meta(model.config, **extra_meta)
    state = encoder_state_dict(model)
    meta["tensors"] = len(state)
    tmp = folder / (ENCODER_FILE + ".tmp")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    tmp.replace(folder / ENCODER_FILE)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder / ENCODER_FILE


def _pyfunc_model() -> Any:
    """A self-contained pyfunc (needs torch + monai only, not bratstune) around ``encoder.pt``."""

    class MaeEncoderModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):  # noqa: D401 - MLflow hook

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

        def predict(self, context, model_input, params=None):
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                tokens, _ = self.vit(x)
            return tokens.mean(dim=1).numpy()

    return MaeEncoderModel()


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
    info = mlflow.pyfunc.log_model(
        name="mae_encoder",
        python_model=_pyfunc_model(),
        artifacts={"encoder": str(folder / ENCODER_FILE), "meta": str(folder / META_FILE)},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}", "numpy"],
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
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
    return {"recon/mse_masked": mse, "recon/mask_ratio": float(mask.float().mean())}
