"""Fingerprints of a cohort: what a model was trained on, to record and to compare against.

* :func:`data_fingerprint`: a short hash of the case ids and the preprocessing config, recorded
  on every run and model (``data.fingerprint`` tag), so "trained on the same data" can be checked.
* :func:`training_fingerprint`: the ranges of the training cases' shape, spacing, orientation and
  intensity percentiles (from ``PreprocessedCase.fingerprint``); batch prediction compares each new
  case against it (:func:`bratstune.predict.drift.check_drift`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bratstune.config_utils import to_dict

__all__ = ["PERCENTILES", "data_fingerprint", "training_fingerprint"]

PERCENTILES = ("p1", "p50", "p99")


def data_fingerprint(case_ids: Iterable[str], preprocess: Any = None) -> str:
    """16-hex-digit hash of the sorted case ids and the preprocessing config."""
    payload = json.dumps(
        {
            "cases": sorted(str(c) for c in case_ids),
            "preprocess": to_dict(preprocess) if preprocess is not None else None,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def training_fingerprint(fingerprints: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarise per-case fingerprints (from ``PreprocessedCase.fingerprint``) of the training data."""
    rows = [f for f in fingerprints if f]
    if not rows:
        return {}
    shapes = np.asarray([r["shape"] for r in rows], dtype=float)
    spacings = np.asarray([r["spacing"] for r in rows], dtype=float)
    intensity: dict[str, dict[str, dict[str, float]]] = {}
    for modality in rows[0].get("intensity", {}):
        per: dict[str, dict[str, float]] = {}
        for q in PERCENTILES:
            values = np.asarray([r["intensity"][modality][q] for r in rows if modality in r.get("intensity", {})])
            per[q] = {"min": float(values.min()), "max": float(values.max()), "median": float(np.median(values))}
        intensity[modality] = per
    return {
        "cases": len(rows),
        "shape": {"min": shapes.min(axis=0).astype(int).tolist(), "max": shapes.max(axis=0).astype(int).tolist()},
        "spacing": {"min": spacings.min(axis=0).tolist(), "max": spacings.max(axis=0).tolist()},
        "orientation": sorted({"".join(r["orientation"]) for r in rows}),
        "intensity": intensity,
    }
