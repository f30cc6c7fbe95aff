"""Drift check: does a new case look like the data the ensemble was trained on?

The per-case fingerprint is :func:`bratstune.data.preprocess.intensity_fingerprint` of the raw
volume (percentiles 1/50/99 of each modality inside the brain, shape, spacing, orientation).
:func:`bratstune.data.fingerprint.training_fingerprint` summarises the fingerprints of the training cases::

    {"cases": n, "shape": {"min": [..], "max": [..]}, "spacing": {"min": [..], "max": [..]},
     "orientation": ["RAS"], "intensity": {"t1n": {"p1": {"min", "max", "median"}, "p50": ..., "p99": ...}}}

:func:`check_drift` compares one case with it and returns human-readable flags (an empty list
means "looks like the training data"). Prediction never refuses a flagged case; the flags go
into ``predictions.csv`` and the QC report. Rules (tolerances in :class:`DriftTolerance`):

* **orientation**: the axis codes (``RAS``, ``LPS`` ...) are not among the training ones;
* **spacing**: an axis differs by more than ``spacing_rel`` (relative) from the training range;
* **shape**: an axis is below ``shape_factor`` x the smallest or above it x the largest training shape;
* **intensity**: for a modality and percentile, the value lies outside the training range widened
  by ``intensity_spread`` x its width on each side (the width is at least
  ``min_relative_width`` x the training median, so a single training case still has a range).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bratstune.data.fingerprint import PERCENTILES

logger = logging.getLogger(__name__)

__all__ = ["DriftTolerance", "check_drift"]


@dataclass(frozen=True)
class DriftTolerance:
    """Thresholds of :func:`check_drift` (see the module docstring)."""

    spacing_rel: float = 0.1
    shape_factor: float = 2.0
    intensity_spread: float = 1.0
    min_relative_width: float = 0.5


def check_drift(
    case: Mapping[str, Any], reference: Mapping[str, Any], tolerance: DriftTolerance | None = None
) -> list[str]:
    """Flags for one case fingerprint against a :func:`~bratstune.data.fingerprint.training_fingerprint` (empty = no drift)."""
    if not reference or not case:
        return []
    tol = tolerance or DriftTolerance()
    flags: list[str] = []
    orientation = "".join(case.get("orientation", []))
    known = list(reference.get("orientation", []))
    if orientation and known and orientation not in known:
        flags.append(f"orientation {orientation} (trained on {'/'.join(known)})")
    spacing = np.asarray(case.get("spacing", []), dtype=float)
    if spacing.size == 3 and "spacing" in reference:
        lo = np.asarray(reference["spacing"]["min"]) * (1 - tol.spacing_rel)
        hi = np.asarray(reference["spacing"]["max"]) * (1 + tol.spacing_rel)
        if np.any(spacing < lo) or np.any(spacing > hi):
            trained = "x".join(f"{v:g}" for v in reference["spacing"]["min"])
            flags.append(f"spacing {'x'.join(f'{v:g}' for v in spacing)} mm (trained on {trained} mm)")
    shape = np.asarray(case.get("shape", []), dtype=float)
    if shape.size == 3 and "shape" in reference:
        lo = np.asarray(reference["shape"]["min"]) / tol.shape_factor
        hi = np.asarray(reference["shape"]["max"]) * tol.shape_factor
        if np.any(shape < lo) or np.any(shape > hi):
            flags.append(f"shape {'x'.join(str(int(v)) for v in shape)} far from the training shapes")
    for modality, stats in case.get("intensity", {}).items():
        ref = reference.get("intensity", {}).get(modality)
        if not ref:
            continue
        bad = []
        for q in PERCENTILES:
            if q not in stats or q not in ref:
                continue
            lo, hi, median = ref[q]["min"], ref[q]["max"], ref[q]["median"]
            width = max(hi - lo, tol.min_relative_width * abs(median), 1e-6)
            value = float(stats[q])
            if value < lo - tol.intensity_spread * width or value > hi + tol.intensity_spread * width:
                bad.append(f"{q}={value:.4g} (trained {lo:.4g}..{hi:.4g})")
        if bad:
            flags.append(f"{modality} intensity " + ", ".join(bad))
    return flags
