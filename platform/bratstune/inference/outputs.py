"""What a segmentation network's output means: its heads, class indices <-> label values, labels.

A network returns one of:

* a tensor ``(B, C, X, Y, Z)``;
* a list / tuple of heads, full resolution first (deep supervision);
* a mapping whose ``"out"`` entry (else its first value) is the prediction;
* MONAI DynUNet's stacked deep-supervision tensor ``(B, H, C, X, Y, Z)`` (head 0 = full resolution).

:func:`output_heads` and :func:`main_output` read all of them; nothing else in bratstune does.

Channels ``C`` are one per ``scheme.train_regions`` (region mode, sigmoid) or background + one per
label value in ascending order (label mode, softmax): class ``c`` is label ``label_values(scheme)[c - 1]``.
:func:`decode_prediction` turns probabilities ``(C, X, Y, Z)`` into a uint8 label map with
:class:`~bratstune.inference.decode.DecodeSettings` (default: threshold 0.5, no post-processing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bratstune.config_utils import check_choice
from bratstune.inference.decode import DecodeSettings

__all__ = [
    "MODES",
    "classes_to_labels",
    "decode_prediction",
    "label_values",
    "labels_to_classes",
    "main_output",
    "output_heads",
]

#: Output modes: sigmoid per region channel, or softmax over background + labels.
MODES = ("region", "label")


def output_heads(output: Any) -> list[Any]:
    """The heads of a model output, full resolution first (see the module docstring)."""
    if isinstance(output, Mapping):
        return output_heads(output.get("out", next(iter(output.values()))))
    if isinstance(output, (list, tuple)):
        return list(output)
    if output.ndim == 6:
        return list(output.unbind(dim=1))
    return [output]


def main_output(output: Any) -> torch.Tensor:
    """The full-resolution prediction ``(B, C, X, Y, Z)`` of a model's output.

    Accepts a tensor ``(B, C, X, Y, Z)``, a list/tuple of heads (first = full resolution), a
    mapping, or MONAI DynUNet's stacked deep-supervision tensor ``(B, H, C, X, Y, Z)``.
    """
    head = output_heads(output)[0]
    if isinstance(head, torch.Tensor) and head.ndim != 6:
        return head
    return main_output(head)


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


def decode_prediction(
    probs: torch.Tensor | np.ndarray, scheme: Any, mode: str, decode: DecodeSettings | None = None
) -> np.ndarray:
    """Probabilities ``(K, x, y, z)`` -> uint8 labels ``(x, y, z)`` in ``scheme``.

    Region mode: ``decode``'s per-region thresholds (hierarchical decode), then its post-processing;
    label mode: arg-max, class index -> label value, then its post-processing.

    Args:
        probs: sigmoid per ``scheme.train_regions`` channel (region) or softmax (label).
        scheme: the label scheme the model predicts.
        mode: ``region`` or ``label``.
        decode: thresholds + post-processing; default threshold 0.5 and no post-processing.
    """
    check_choice(mode, MODES, "mode")
    array = probs.numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    settings = decode if decode is not None else DecodeSettings()
    if mode == "region":
        return settings.decode_regions(array, scheme)
    return settings.apply_postprocess(classes_to_labels(array.argmax(axis=0), scheme), scheme)
