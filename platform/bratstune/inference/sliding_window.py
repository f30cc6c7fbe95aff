"""Ensemble inference: sliding window + test-time augmentation + mean of probabilities.

For one preprocessed volume ``(C, x, y, z)`` (cropped and normalised by
:func:`bratstune.data.preprocess.preprocess_case`) and ``M`` member networks::

    p(v) = 1 / (M * V) * sum_m sum_t  T_t^-1( f_m( T_t(x) ) )

where ``f_m`` is member ``m``'s sliding-window prediction (MONAI ``sliding_window_inference``,
window ``roi_size``, ``overlap``, Gaussian or constant blending; sigmoid per region in region
mode, softmax over background + labels in label mode) and ``T_t`` the ``V`` test-time views:

* ``flips``: every subset of the three spatial axes flipped (8 views, identity included);
* ``rotate90``: in-plane (first two spatial axes, the axial plane of a BraTS volume) rotations by
  90 and 270 degrees (180 is already the X+Y flip). Rotations swap the in-plane axes, so they
  assume isotropic in-plane spacing (true for BraTS).

The mean is accumulated in float32 in a fixed order, so the same members on the same input give
bit-identical probabilities in any process (with the same number of torch threads).

:func:`probabilities_on_grid` pastes the cropped probabilities back into the input's grid
*before* thresholding (the preprocessing does not resample; if it ever does, the probabilities
are what must be resampled — thresholding first loses accuracy at the boundary).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "BLENDS",
    "InferenceConfig",
    "View",
    "apply_view",
    "ensemble_probabilities",
    "invert_view",
    "probabilities_on_grid",
    "tta_views",
]

BLENDS = ("gaussian", "constant")


@dataclass(frozen=True)
class View:
    """One test-time view: flip ``flips`` (spatial axes 0..2), then rotate by ``k`` x 90 degrees in-plane."""

    flips: tuple[int, ...] = ()
    k: int = 0

    @property
    def name(self) -> str:
        flip = "".join("XYZ"[a] for a in self.flips) or "-"
        return f"flip[{flip}]rot{90 * self.k}"


@dataclass(frozen=True)
class InferenceConfig:
    """How the ensemble runs a volume.

    Args:
        roi_size: sliding-window size ``(P, P, P)``; ``None`` = the members' training patch size.
        overlap: window overlap in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        blend: ``gaussian`` (down-weights window borders) or ``constant``.
        flips: test-time flips on all axes (8 views).
        rotate90: add the two in-plane 90-degree rotations as views.
    """

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend: str = "gaussian"
    flips: bool = True
    rotate90: bool = False

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            roi = tuple(int(v) for v in (self.roi_size if not isinstance(self.roi_size, int) else (self.roi_size,) * 3))
            if len(roi) != 3 or any(v <= 0 for v in roi):
                raise ConfigError(f"inference.roi_size: expected three positive integers, got {self.roi_size!r}")
            object.__setattr__(self, "roi_size", roi)
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ConfigError(f"inference.overlap: expected 0 <= value < 1, got {self.overlap!r}")
        if int(self.sw_batch_size) < 1:
            raise ConfigError(f"inference.sw_batch_size: expected >= 1, got {self.sw_batch_size!r}")
        check_choice(self.blend, BLENDS, "inference.blend")

    def views(self) -> list[View]:
        return tta_views(flips=self.flips, rotate90=self.rotate90)


def tta_views(*, flips: bool = True, rotate90: bool = False) -> list[View]:
    """The test-time views, identity first (``flips``: 8, ``rotate90``: +2)."""
    views = [View()]
    if flips:
        for n in (1, 2, 3):
            views.extend(View(tuple(c)) for c in itertools.combinations((0, 1, 2), n))
    if rotate90:
        views.extend([View((), 1), View((), 3)])
    return views


def apply_view(volume: torch.Tensor, view: View) -> torch.Tensor:
    """Transform a batch ``(B, C, X, Y, Z)``: flip, then rotate in the X-Y plane."""
    out = volume
    if view.flips:
        out = torch.flip(out, dims=[2 + a for a in view.flips])
    if view.k:
        out = torch.rot90(out, view.k, dims=(2, 3))
    return out


def invert_view(volume: torch.Tensor, view: View) -> torch.Tensor:
    """Undo :func:`apply_view` on a prediction ``(B, K, ...)``."""
    out = volume
    if view.k:
        out = torch.rot90(out, -view.k, dims=(2, 3))
    if view.flips:
        out = torch.flip(out, dims=[2 + a for a in view.flips])
    return out


def _main_output(output: Any) -> torch.Tensor:
    from bratstune.training.validate import main_output

    return main_output(output)


@torch.no_grad()
def ensemble_probabilities(
    models: Sequence[torch.nn.Module],
    image: np.ndarray | torch.Tensor,
    *,
    mode: str,
    roi_sizes: Sequence[Sequence[int]],
    config: InferenceConfig,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean probabilities of ``models`` over the test-time views of ``image``.

    Args:
        models: member networks (eval mode, already on ``device``).
        image: ``(C, x, y, z)`` float32 preprocessed volume.
        mode: ``region`` (sigmoid per channel) or ``label`` (softmax over channels).
        roi_sizes: sliding-window size per model (``config.roi_size`` or the member's patch size).
        config: overlap, blending, views.
        device: where the networks run.
        amp_dtype: autocast dtype on CUDA (``None`` = full precision).

    Returns:
        float32 ``(K, x, y, z)`` on the CPU.
    """
    from monai.inferers import sliding_window_inference

    if not models:
        raise ConfigError("an ensemble needs at least one member network")
    if len(roi_sizes) != len(models):
        raise ValueError(f"expected one roi size per model ({len(models)}), got {len(roi_sizes)}")
    check_choice(mode, ("region", "label"), "mode")
    device = torch.device(device)
    volume = torch.as_tensor(np.array(image, dtype=np.float32, copy=True))[None].to(device)
    views = config.views()
    total: torch.Tensor | None = None
    for model, roi_size in zip(models, roi_sizes):
        def predictor(batch: torch.Tensor, _model: torch.nn.Module = model) -> torch.Tensor:
            return _main_output(_model(batch)).float()

        for view in views:
            if amp_dtype is not None and device.type == "cuda":
                with torch.autocast(device.type, dtype=amp_dtype):
                    logits = sliding_window_inference(
                        apply_view(volume, view), roi_size=tuple(roi_size), sw_batch_size=config.sw_batch_size,
                        predictor=predictor, overlap=config.overlap, mode=config.blend,
                    )
            else:
                logits = sliding_window_inference(
                    apply_view(volume, view), roi_size=tuple(roi_size), sw_batch_size=config.sw_batch_size,
                    predictor=predictor, overlap=config.overlap, mode=config.blend,
                )
            logits = invert_view(logits.float(), view)[0]
            probs = torch.sigmoid(logits) if mode == "region" else torch.softmax(logits, dim=0)
            total = probs if total is None else total.add_(probs)
    if total is None:  # pragma: no cover - models is not empty
        raise ConfigError("no prediction was made")
    return total.div_(len(models) * len(views)).cpu()


def probabilities_on_grid(
    probs: np.ndarray | torch.Tensor,
    bbox: Sequence[slice],
    original_shape: Sequence[int],
    *,
    mode: str,
) -> np.ndarray:
    """Paste cropped probabilities ``(K, x, y, z)`` back into the input grid ``(K, X, Y, Z)``.

    Outside the crop (no brain) every region probability is 0; in label mode the background
    channel (0) is 1 there.
    """
    from bratstune.data.preprocess import uncrop

    array = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    out = uncrop(np.ascontiguousarray(array, dtype=np.float32), bbox, original_shape, fill=0.0)
    if mode == "label":
        outside = np.ones(out.shape[1:], dtype=bool)
        outside[tuple(bbox)] = False
        out[0][outside] = 1.0
    return out
