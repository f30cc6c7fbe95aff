"""Whole-volume validation: sliding-window prediction, decoding to labels, per-region metrics.

For each validation case (cropped, normalised ``(4, x, y, z)`` from the cache):

1. MONAI ``sliding_window_inference`` with the configured window, overlap and blending
   (:func:`bratstune.inference.sliding_window.predict_probabilities`);
2. region mode: sigmoid per region channel, then ``labels.regions_to_labels`` (hierarchical
   decode); label mode: softmax, arg-max, class index -> label value
   (:func:`bratstune.inference.outputs.decode_prediction`);
3. legacy Dice per evaluated region of the scheme (:func:`region_dice`; empty reference and
   empty prediction count as 1.0, BraTS convention) and the BraTS lesion-wise metrics.

Metric names: ``val/dice_<REGION>``, ``val/dice_mean`` and whatever ``lesion_wise`` returns,
prefixed ``val/`` (e.g. ``val/dice_lesion_ET``, ``val/hd95_lesion_WT``,
``val/dice_lesion_mean``), plus lesion-wise recall and precision (``val/recall_lesion_<R>`` =
TP / (TP + FN) of the lesions the protocol counts, ``val/precision_lesion_<R>`` = TP / (TP + FP)
of the predicted components; a case without any leaves the mean alone) and voxel sensitivity
(``val/sensitivity_<R>``). Every value is the mean over the validation cases.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bratstune.inference.decode import DecodeSettings
from bratstune.inference.outputs import decode_prediction, label_values, labels_to_classes
from bratstune.inference.sliding_window import InferenceConfig, predict_probabilities
from bratstune.metrics import challenges, lesion_wise

logger = logging.getLogger(__name__)

__all__ = [
    "LESION_KEYS",
    "case_lesion_metrics",
    "lesion_challenge",
    "region_dice",
    "save_overlay_png",
    "validate",
]


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


def lesion_challenge(challenge: str) -> str:
    """The lesion-wise rules to apply: ``challenge`` if the brats2023 protocol knows it, else GLI's."""
    name = str(challenge).strip().upper()
    return name if name in challenges("brats2023") else "GLI"


def case_lesion_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    scheme: Any,
    challenge: str,
    spacing: Sequence[float],
    *,
    protocol: str = "brats2023",
) -> dict[str, float]:
    """BraTS lesion-wise Dice / HD95 and legacy HD95 per region of ``scheme`` (plus means).

    Keys: ``dice_lesion_<R>``, ``hd95_lesion_<R>``, ``hd95_<R>``, ``recall_lesion_<R>``,
    ``precision_lesion_<R>``, ``sensitivity_<R>`` (voxels), and ``..._mean`` over regions
    (recall/precision are NaN where their denominator is 0).
    ``protocol``: ``brats2023`` (the rules of GLI/SSA/PED/MEN/MET 2023) or ``brats2026``.
    """
    raw = lesion_wise(
        pred,
        ref,
        lesion_challenge(challenge),
        protocol=protocol,
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
    for prefix, ratio in _COUNT_RATIOS.items():
        values = [ratio(row) for row in raw.values()]
        out.update({f"{prefix}_{region}": value for region, value in zip(raw, values)})
        out[f"{prefix}_mean"] = _mean(values)
    return out


def _share(part: float, other: float) -> float:
    return float(part) / float(part + other) if part + other > 0 else float("nan")


#: metric prefix -> its value from one region's ``lesion_wise`` row (lesion counts, voxel sensitivity)
_COUNT_RATIOS = {
    "recall_lesion": lambda row: _share(row["num_tp"], row["num_fn"]),
    "precision_lesion": lambda row: _share(row["num_tp"], row["num_fp"]),
    "sensitivity": lambda row: float(row.get("sensitivity", float("nan"))),
}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def validate(
    model: torch.nn.Module,
    cases: Sequence[Any],
    scheme: Any,
    settings: InferenceConfig,
    *,
    challenge: str | None = None,
    lesion_metrics: bool = True,
    protocol: str = "brats2023",
    decode: DecodeSettings | None = None,
) -> dict[str, float]:
    """Validate ``model`` on whole cases; return ``val/...`` metrics averaged over cases.

    Args:
        model: the network (switched to eval mode here and back to train mode after).
        cases: ``PreprocessedCase`` objects with labels.
        scheme: the label scheme of the cases.
        settings: sliding-window settings.
        challenge: BraTS challenge for the lesion-wise rules (``None`` skips them).
        lesion_metrics: compute the lesion-wise metrics (with ``challenge``).
        protocol: lesion-wise rules (``brats2023`` or ``brats2026``).
        decode: thresholds + post-processing applied before every metric (default: 0.5, none).
    """
    with_lesions = bool(lesion_metrics and challenge)
    per_metric: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        for case in cases:
            if case.label is None:
                continue
            ref = np.asarray(case.label)
            pred = decode_prediction(predict_probabilities(model, case.image, settings), scheme, settings.mode, decode)
            dice = region_dice(pred, ref, scheme)
            for region, value in dice.items():
                per_metric.setdefault(f"val/dice_{region}", []).append(value)
            per_metric.setdefault("val/dice_mean", []).append(float(np.mean(list(dice.values()))))
            if with_lesions:
                for key, value in case_lesion_metrics(
                    pred, ref, scheme, challenge, case.spacing, protocol=protocol
                ).items():
                    per_metric.setdefault(f"val/{key}", []).append(value)
    finally:
        model.train(was_training)
    # NaN (no lesion to recall in a case) leaves the mean of the others; all NaN stays NaN
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
    # Deferred: matplotlib is heavy and only the train command draws this figure.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.colors import ListedColormap  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

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
                ax.imshow(
                    np.ma.masked_equal(classes, 0) - 1,
                    cmap=cmap,
                    vmin=0,
                    vmax=max(1, len(values) - 1),
                    alpha=0.5,
                    origin="lower",
                    interpolation="nearest",
                )
            ax.set_title(f"{case_id} {title} (z={z})", fontsize=8)
            ax.axis("off")
    handles = [Patch(color=palette[i], label=f"{v} {scheme.labels[v]}") for i, v in enumerate(values)]
    fig.legend(handles=handles, loc="lower center", ncol=len(values), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
