"""Inference: sliding window + test-time views + ensemble mean, output heads, decode, post-processing.

* :mod:`~bratstune.inference.sliding_window`: :class:`InferenceConfig` (the one settings type),
  :func:`predict_probabilities` (one network), :func:`ensemble_probabilities` (mean over networks
  and views), :func:`probabilities_on_grid`;
* :mod:`~bratstune.inference.views`: test-time flips and rotations;
* :mod:`~bratstune.inference.outputs`: model output heads, class indices <-> label values,
  :func:`decode_prediction`;
* :mod:`~bratstune.inference.decode`: :class:`DecodeSettings` (per-region thresholds + post-processing);
* :mod:`~bratstune.inference.postprocess`: dust removal and hole filling.

The names below load on first use, so ``bratstune.inference.decode`` and ``.postprocess`` stay
importable without torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DecodeSettings": "decode",
    "InferenceConfig": "sliding_window",
    "PostprocessConfig": "postprocess",
    "View": "views",
    "classes_to_labels": "outputs",
    "decode_prediction": "outputs",
    "ensemble_probabilities": "sliding_window",
    "label_values": "outputs",
    "labels_to_classes": "outputs",
    "main_output": "outputs",
    "output_heads": "outputs",
    "postprocess": "postprocess",
    "predict_probabilities": "sliding_window",
    "probabilities_on_grid": "sliding_window",
    "tta_views": "views",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
