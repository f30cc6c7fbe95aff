"""Whole-volume validation: sliding-window prediction, decoding to labels, per-region metrics.

For each validation case (cropped, normalised ``(4, x, y, z)`` from the cache):

1. MONAI ``sliding_window_inference`` with the configured window, overlap and blending;
2. region mode: sigmoid per region channel, then ``labels.regions_to_labels`` (hierarchical
   decode); label mode: softmax, arg-max, class index -> label value;
3. legacy Dice per evaluated region of the scheme (:func:`region_dice`; empty reference and
   empty prediction count as 1.0, BraTS convention) and, when ``bratstune.metrics`` is
   available, the BraTS lesion-wise metrics.

Metric names: ``val/dice_<REGION>``, ``val/dice_mean`` and whatever ``lesion_wise`` returns,
prefixed ``val/`` (e.g. ``val/dice_lesion_ET``, ``val/hd95_lesion_WT``,
``val/dice_lesion_mean``). Every value is the mean over the validation cases.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "InferenceSettings",
    "classes_to_labels",
    "decode_prediction",
    "label_values",
    "labels_to_classes",
    "case_lesion_metrics",
    "main_output",
    "predict_probabilities",
    "region_dice",
    "save_overlay_png",
    "validate",
]


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the sliding window (resolved from the config and the device)."""

    roi_size: tuple[int, int, int]
    overlap: float = 0.25
    sw_batch_size: int = 2
    blend: str = "gaussian"
    mode: str = "region"
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None


def main_output(output: Any) -> torch.Tensor:
    """The full-resolution prediction of a model's output.

    Accepts a tensor ``(B, C, X, Y, Z)``, a list/tuple of heads (first = full resolution), or
    MONAI DynUNet's stacked deep-supervision tensor ``(B, H, C, X, Y, Z)``.
    """
    if isinstance(output, (list, tuple)):
        return main_output(output[0])
    if isinstance(output, Mapping):
        return main_output(output.get("out", next(iter(output.values()))))
    if output.ndim == 6:
        return output[:, 0]
    return output


def label_values(scheme: Any) -> tuple[int, ...]:
    """Non-zero label values of a scheme in class-index order (class ``c`` -> ``values[c-1]``)."""
    return tuple(sorted(int(v) for v in scheme.labels))


def labels_to_classes(seg: np.ndarray, scheme: Any) -> np.ndarray:
    """Label values -> contiguous class indices ``0..K`` (label-mode targets), int64."""
    lut = np.zeros(256, dtype=np.int64)
    for index, value in enumerate(label_values(scheme), start=1):
        lut[value] = index
    return lut[np.asarray(seg, dtype=np.uint8)]


def classes_to_labels(classes: np.ndarray, scheme: Any) -> np.ndarray:
    """Class indices ``0..K`` -> label values (uint8)."""
    lut = np.asarray((0, *label_values(scheme)), dtype=np.uint8)
    return lut[np.asarray(classes, dtype=np.int64)]


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: np.ndarray | torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Sliding-window probabilities of one volume.

    Args:
        model: a segmentation network (put in eval mode by the caller).
        image: ``(C, x, y, z)`` float32.
        settings: window, overlap, blending, output mode, device, autocast dtype.

    Returns:
        float32 ``(K, x, y, z)`` on the CPU: sigmoid per region (region mode) or softmax over
        background + labels (label mode).
    """
    from monai.inferers import sliding_window_inference

    volume = torch.as_tensor(np.array(image, dtype=np.float32))[None].to(settings.device)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        return main_output(model(batch)).float()

    autocast = (
        torch.autocast(settings.device.type, dtype=settings.amp_dtype)
        if settings.amp_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        logits = sliding_window_inference(
            volume,
            roi_size=settings.roi_size,
            sw_batch_size=settings.sw_batch_size,
            predictor=predictor,
            overlap=settings.overlap,
            mode=settings.blend,
        )
    logits = logits.float()[0]
    probs = torch.sigmoid(logits) if settings.mode == "region" else torch.softmax(logits, dim=0)
    return probs.cpu()


def decode_prediction(probs: torch.Tensor | np.ndarray, scheme: Any, mode: str) -> np.ndarray:
    """Probabilities ``(K, x, y, z)`` -> uint8 labels ``(x, y, z)`` in ``scheme``."""
    probs = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    if mode == "region":
        from bratstune.labels import regions_to_labels

        return np.asarray(regions_to_labels(probs, scheme), dtype=np.uint8)
    return classes_to_labels(probs.argmax(axis=0), scheme)


def region_dice(pred: np.ndarray, ref: np.ndarray, scheme: Any) -> dict[str, float]:
    """Legacy (whole-volume) Dice per evaluated region of ``scheme``.

    :math:`D = 2|P \\cap R| / (|P| + |R|)`, with :math:`D = 1` when both are empty.
    """
    out: dict[str, float] = {}
    for region, members in scheme.regions.items():
        p = np.isin(pred, members)
        r = np.isin(ref, members)
        denom = int(p.sum()) + int(r.sum())
        out[region] = 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, r).sum()) / denom
    return out


#: ``lesion_wise`` result key -> metric name prefix (``<prefix>_<REGION>``, plus ``<prefix>_mean``).
LESION_KEYS = {"lesionwise_dice": "dice_lesion", "lesionwise_hd95": "hd95_lesion", "legacy_hd95": "hd95"}


def _lesion_metric_fn() -> Callable[..., Mapping[str, Any]] | None:
    try:
        from bratstune.metrics import lesion_wise
    except ImportError:
        return None
    return lesion_wise


def lesion_challenge(challenge: str) -> str:
    """The lesion-wise rules to apply: ``challenge`` if the brats2023 protocol knows it, else GLI's."""
    from bratstune.metrics import challenges

    name = str(challenge).strip().upper()
    return name if name in challenges("brats2023") else "GLI"


def case_lesion_metrics(pred: np.ndarray, ref: np.ndarray, scheme: Any, challenge: str, spacing: Sequence[float]) -> dict[str, float]:
    """BraTS 2023 lesion-wise Dice / HD95 and legacy HD95 per region of ``scheme`` (plus means).

    Keys: ``dice_lesion_<R>``, ``hd95_lesion_<R>``, ``hd95_<R>``, and ``..._mean`` over regions.
    """
    fn = _lesion_metric_fn()
    if fn is None:
        return {}
    raw = fn(
        pred,
        ref,
        lesion_challenge(challenge),
        spacing=tuple(float(s) for s in spacing),
        regions={r: tuple(v) for r, v in scheme.regions.items()},
    )
    out: dict[str, float] = {}
    for key, prefix in LESION_KEYS.items():
        values = []
        for region, row in raw.items():
            if key in row and row[key] is not None:
                out[f"{prefix}_{region}"] = float(row[key])
                values.append(float(row[key]))
        if values:
            out[f"{prefix}_mean"] = _mean(values)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validate(
    model: torch.nn.Module,
    cases: Sequence[Any],
    scheme: Any,
    settings: InferenceSettings,
    *,
    challenge: str | None = None,
    lesion_metrics: bool = True,
) -> dict[str, float]:
    """Validate ``model`` on whole cases; return ``val/...`` metrics averaged over cases.

    Args:
        model: the network (switched to eval mode here and back to train mode after).
        cases: ``PreprocessedCase`` objects with labels.
        scheme: the label scheme of the cases.
        settings: sliding-window settings.
        challenge: BraTS challenge for the lesion-wise rules (``None`` skips them).
        lesion_metrics: compute lesion-wise metrics when ``bratstune.metrics`` is importable.
    """
    with_lesions = bool(lesion_metrics and challenge and _lesion_metric_fn() is not None)
    if lesion_metrics and challenge and not with_lesions:
        logger.debug("bratstune.metrics.lesion_wise not available: lesion-wise metrics skipped")
    per_metric: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            if case.label is None:
                continue
            ref = np.asarray(case.label)
            pred = decode_prediction(predict_probabilities(model, case.image, settings), scheme, settings.mode)
            dice = region_dice(pred, ref, scheme)
            for region, value in dice.items():
                per_metric.setdefault(f"val/dice_{region}", []).append(value)
            per_metric.setdefault("val/dice_mean", []).append(float(np.mean(list(dice.values()))))
            if with_lesions:
                for key, value in case_lesion_metrics(pred, ref, scheme, challenge, case.spacing).items():
                    per_metric.setdefault(f"val/{key}", []).append(value)
    finally:
        model.train(was_training)
    return {name: _mean(values) for name, values in per_metric.items()}


def _overlay_slice(ref: np.ndarray) -> int:
    """Axial index (last axis) with the largest reference tumour area (middle if none)."""
    area = (np.asarray(ref) > 0).sum(axis=(0, 1))
    return int(area.argmax()) if area.any() else ref.shape[2] // 2


def save_overlay_png(
    path: Path | str,
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    scheme: Any,
    *,
    channel: int = 3,
) -> Path:
    """Write a PNG of validation slices: image, reference overlay, prediction overlay per case.

    Args:
        path: output ``.png``.
        rows: ``(case_id, image (C, x, y, z), reference labels, predicted labels)`` per case.
        scheme: label scheme (legend names).
        channel: image channel shown (3 = FLAIR / t2f in ``MODALITIES`` order).

    Returns:
        ``path``. Uses matplotlib's object API with the Agg canvas (no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    values = label_values(scheme)
    palette = ["#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3", "#ffff33"]
    cmap = ListedColormap(palette[: len(values)])
    fig = Figure(figsize=(9, 3 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for row, (case_id, image, ref, pred) in zip(axes, rows):
        z = _overlay_slice(ref)
        background = np.asarray(image)[min(channel, image.shape[0] - 1), :, :, z].T
        for ax, (title, seg) in zip(row, (("image", None), ("reference", ref), ("prediction", pred))):
            ax.imshow(background, cmap="gray", origin="lower")
            if seg is not None:
                classes = labels_to_classes(np.asarray(seg)[:, :, z], scheme).T.astype(float)
                ax.imshow(np.ma.masked_equal(classes, 0) - 1, cmap=cmap, vmin=0, vmax=max(1, len(values) - 1),
                          alpha=0.5, origin="lower", interpolation="nearest")
            ax.set_title(f"{case_id} {title} (z={z})", fontsize=8)
            ax.axis("off")
    handles = [Patch(color=palette[i], label=f"{v} {scheme.labels[v]}") for i, v in enumerate(values)]
    fig.legend(handles=handles, loc="lower center", ncol=len(values), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
