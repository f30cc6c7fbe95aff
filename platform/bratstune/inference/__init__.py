"""Inference: sliding window + test-time views + ensemble mean, output heads, decode, post-processing.

* :mod:`~bratstune.inference.sliding_window`: :class:`InferenceConfig` (the one settings type),
  :func:`predict_probabilities` (one network), :func:`ensemble_probabilities` (mean over networks
  and views), :func:`probabilities_on_grid`;
* :mod:`~bratstune.inference.views`: test-time flips and rotations;
* :mod:`~bratstune.inference.outputs`: model output heads, class indices <-> label values,
  :func:`decode_prediction`;
* :mod:`~bratstune.inference.decode`: :class:`DecodeSettings` (per-region thresholds + post-processing);
* :mod:`~bratstune.inference.postprocess`: dust removal and hole filling.

Importing this package imports nothing: ``decode`` and ``postprocess`` need no torch, so
``bratstune evaluate`` does not pay for it. Import the module you need.
"""

__all__ = ["decode", "outputs", "postprocess", "sliding_window", "views"]
