"""Sliding-window inference: one network or an ensemble, with test-time views, one settings type.

For one preprocessed volume ``(C, x, y, z)`` (cropped and normalised by
:func:`bratstune.data.preprocess.preprocess_case`) and ``M`` member networks::

    p(v) = 1 / (M * V) * sum_m sum_t  T_t^-1( f_m( T_t(x) ) )

where ``f_m`` is member ``m``'s sliding-window prediction (MONAI ``sliding_window_inference``,
window ``roi_size``, ``overlap``, Gaussian or constant blending; sigmoid per region in region
mode, softmax over background + labels in label mode) and ``T_t`` the ``V`` test-time views of
:mod:`bratstune.inference.views` (flips, in-plane rotations).

:class:`InferenceConfig` is the one description of such a run: validation during training uses it
without views (:func:`predict_probabilities`), a packaged ensemble with them
(:func:`ensemble_probabilities`).

The mean is accumulated in float32 in a fixed order, so the same members on the same input give
bit-identical probabilities in any process (with the same number of torch threads).

:func:`probabilities_on_grid` pastes the cropped probabilities back into the model grid and, when
preprocessing reoriented or resampled the case, brings them onto the input's grid *before*
thresholding (linear interpolation of probabilities: thresholding first, then resampling labels,
loses accuracy at every boundary).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from bratstune.config_utils import check_choice
from bratstune.data.preprocess import uncrop
from bratstune.data.resample import GridMap, to_input_grid
from bratstune.errors import ConfigError
from bratstune.inference.outputs import MODES, main_output
from bratstune.inference.views import View, apply_view, invert_view, tta_views

logger = logging.getLogger(__name__)

__all__ = [
    "BLENDS",
    "RECIPE_KEYS",
    "InferenceConfig",
    "ensemble_probabilities",
    "predict_probabilities",
    "probabilities_on_grid",
]

BLENDS = ("gaussian", "constant")
#: The fields that describe the recipe (saved with an ensemble); the others say how this process runs it.
RECIPE_KEYS = ("roi_size", "overlap", "sw_batch_size", "blend", "flips", "rotate90")


@dataclass(frozen=True)
class InferenceConfig:
    """How a volume runs through the network(s): window, overlap, blending, views, output mode, device.

    The recipe (:data:`RECIPE_KEYS`) travels with an ensemble (``ensemble.json`` ``inference``);
    ``mode``, ``device`` and ``amp_dtype`` are set by whoever runs it (the member networks' loss
    mode, this process's device).

    Args:
        roi_size: sliding-window size ``(P, P, P)`` (an int means isotropic); ``None`` = each
            network's training patch size (ensembles only).
        overlap: window overlap in ``[0, 1)``.
        sw_batch_size: windows per forward pass.
        blend: ``gaussian`` (down-weights window borders) or ``constant``.
        flips: test-time flips on all axes (8 views).
        rotate90: add the two in-plane 90-degree rotations as views.
        mode: ``region`` (sigmoid per channel) or ``label`` (softmax over channels).
        device: where the networks run.
        amp_dtype: autocast dtype (``None`` = full precision).
    """

    roi_size: tuple[int, int, int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    blend: str = "gaussian"
    flips: bool = False
    rotate90: bool = False
    mode: str = "region"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            size = self.roi_size
            roi = tuple(int(v) for v in ((size,) * 3 if isinstance(size, int) else size))
            if len(roi) != 3 or any(v <= 0 for v in roi):
                raise ConfigError(f"inference.roi_size: expected three positive integers, got {self.roi_size!r}")
            object.__setattr__(self, "roi_size", roi)
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ConfigError(f"inference.overlap: expected 0 <= value < 1, got {self.overlap!r}")
        if int(self.sw_batch_size) < 1:
            raise ConfigError(f"inference.sw_batch_size: expected >= 1, got {self.sw_batch_size!r}")
        check_choice(self.blend, BLENDS, "inference.blend")
        check_choice(self.mode, MODES, "inference.mode")
        object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **run: Any) -> InferenceConfig:
        """The recipe of a mapping (``ensemble.json`` ``inference``), plus run fields ``run``.

        Raises:
            ConfigError: a key that is not a recipe field.
        """
        unknown = sorted(set(mapping) - set(RECIPE_KEYS))
        if unknown:
            raise ConfigError(f"inference: unknown key(s) {unknown}; expected some of {list(RECIPE_KEYS)}")
        return cls(**dict(mapping), **run)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON (what :meth:`from_mapping` reads back)."""
        out = {key: getattr(self, key) for key in RECIPE_KEYS}
        out["roi_size"] = list(self.roi_size) if self.roi_size is not None else None
        return out

    def views(self) -> list[View]:
        """The test-time views of this recipe, identity first."""
        return tta_views(flips=self.flips, rotate90=self.rotate90)


def _sliding_window(
    model: torch.nn.Module, volume: torch.Tensor, roi_size: Sequence[int], config: InferenceConfig
) -> torch.Tensor:
    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return main_output(model(batch)).float()

    autocast = (
        torch.autocast(config.device.type, dtype=config.amp_dtype)
        if config.amp_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        return sliding_window_inference(
            volume,
            roi_size=tuple(roi_size),
            sw_batch_size=config.sw_batch_size,
            predictor=predictor,
            overlap=config.overlap,
            mode=config.blend,
        )


@torch.no_grad()
def ensemble_probabilities(
    models: Sequence[torch.nn.Module],
    image: np.ndarray | torch.Tensor,
    config: InferenceConfig,
    *,
    roi_sizes: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Mean probabilities of ``models`` over the test-time views of ``image``.

    Args:
        models: member networks (eval mode, already on ``config.device``).
        image: ``(C, x, y, z)`` float32 preprocessed volume.
        config: window, overlap, blending, views, output mode, device, autocast dtype.
        roi_sizes: sliding-window size per model; default ``config.roi_size`` for every model.

    Returns:
        float32 ``(K, x, y, z)`` on the CPU.
    """
    if not models:
        raise ConfigError("an ensemble needs at least one member network")
    if roi_sizes is None:
        if config.roi_size is None:
            raise ConfigError("inference.roi_size is not set: give the window size (or one per model)")
        roi_sizes = [config.roi_size] * len(models)
    if len(roi_sizes) != len(models):
        raise ValueError(f"expected one roi size per model ({len(models)}), got {len(roi_sizes)}")
    volume = torch.as_tensor(np.array(image, dtype=np.float32, copy=True))[None].to(config.device)
    views = config.views()
    total: torch.Tensor | None = None
    for model, roi_size in zip(models, roi_sizes):
        for view in views:
            logits = _sliding_window(model, apply_view(volume, view), roi_size, config)
            logits = invert_view(logits.float(), view)[0]
            probs = torch.sigmoid(logits) if config.mode == "region" else torch.softmax(logits, dim=0)
            total = probs if total is None else total.add_(probs)
    if total is None:  # pragma: no cover - models is not empty
        raise ConfigError("no prediction was made")
    return total.div_(len(models) * len(views)).cpu()


def predict_probabilities(
    model: torch.nn.Module, image: np.ndarray | torch.Tensor, settings: InferenceConfig
) -> torch.Tensor:
    """Sliding-window probabilities of one volume by one network (the views of ``settings`` included).

    Args:
        model: a segmentation network (put in eval mode by the caller).
        image: ``(C, x, y, z)`` float32.
        settings: window (``roi_size`` must be set), overlap, blending, output mode, device, autocast dtype.

    Returns:
        float32 ``(K, x, y, z)`` on the CPU: sigmoid per region (region mode) or softmax over
        background + labels (label mode).
    """
    return ensemble_probabilities([model], image, settings)


def probabilities_on_grid(
    probs: np.ndarray | torch.Tensor,
    bbox: Sequence[slice],
    original_shape: Sequence[int],
    *,
    mode: str,
    grid: GridMap | None = None,
) -> np.ndarray:
    """Paste cropped probabilities ``(K, x, y, z)`` back into the model grid, then onto the input grid.

    Outside the crop (no brain) every region probability is 0; in label mode the background
    channel (0) is 1 there. With ``grid`` (``PreprocessedCase.grid``: the case was reoriented
    and/or resampled), the probabilities on the model grid ``original_shape`` are mapped back to
    the input grid ``grid.input_shape`` by :func:`bratstune.data.resample.to_input_grid` (inverse
    reorientation, linear interpolation); region probabilities stay in ``[0, 1]`` and label-mode
    channels still sum to 1 (linear interpolation is a convex combination).

    Returns:
        float32 ``(K, X, Y, Z)`` on the input grid.
    """
    array = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    out = uncrop(np.ascontiguousarray(array, dtype=np.float32), bbox, original_shape, fill=0.0)
    if mode == "label":
        outside = np.ones(out.shape[1:], dtype=bool)
        outside[tuple(bbox)] = False
        out[0][outside] = 1.0
    if grid is not None:
        out = to_input_grid(out, grid, order=1)
    return out
