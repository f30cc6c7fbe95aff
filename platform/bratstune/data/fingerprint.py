"""Fingerprints of a cohort: what a model was trained on, to record and to compare against.

* :func:`data_fingerprint`: a short hash of the case ids and the preprocessing config (and, when
  it is on, the training-label dust removal), recorded on every run and model
  (``data.fingerprint`` tag), so "trained on the same data" can be checked.
* :func:`training_fingerprint`: the ranges of the training cases' shape, spacing, orientation and
  intensity percentiles (from ``PreprocessedCase.fingerprint``); batch prediction compares each new
  case against it (:func:`bratstune.predict.drift.check_drift`). It also records the model grid
  the cases were preprocessed to (``"grid": {"spacing", "orientation"}``) when they all share one:
  the spacing and orientation a model trained on them works in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from bratstune.config_utils import to_dict

__all__ = ["PERCENTILES", "data_fingerprint", "legacy_grid", "training_fingerprint"]

PERCENTILES = ("p1", "p50", "p99")


def data_fingerprint(case_ids: Iterable[str], preprocess: Any = None, *, label_dust: Any = None) -> str:
    """16-hex-digit hash of the sorted case ids and the preprocessing config.

    ``label_dust``: the training config's ``data.label_dust`` (``LabelDustConfig`` or mapping); when
    it is enabled the training targets differ, and so does the hash (off: the hash without it).
    """
    content: dict[str, Any] = {
        "cases": sorted(str(c) for c in case_ids),
        "preprocess": to_dict(preprocess) if preprocess is not None else None,
    }
    dust = to_dict(label_dust) if label_dust is not None else None
    if dust and dust.get("enabled"):
        content["label_dust"] = dust
    payload = json.dumps(content, sort_keys=True, default=str)
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
        "spacing": {
            "min": spacings.min(axis=0).tolist(),
            "max": spacings.max(axis=0).tolist(),
            "median": np.median(spacings, axis=0).tolist(),
        },
        "orientation": sorted({"".join(r["orientation"]) for r in rows}),
        "intensity": intensity,
        **_common_grid(rows),
    }


def _common_grid(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"grid": {"spacing", "orientation"}}`` when every case was preprocessed to the same model grid."""
    grids = [r.get("grid") for r in rows]
    if not grids or any(not g for g in grids):
        return {}
    first = grids[0]
    spacing = np.asarray(first["spacing"], dtype=float)
    same = all(
        g["orientation"] == first["orientation"]
        and np.allclose(np.asarray(g["spacing"], dtype=float), spacing, rtol=1e-3, atol=0)
        for g in grids
    )
    if not same:
        return {}
    return {"grid": {"spacing": [float(v) for v in spacing], "orientation": str(first["orientation"])}}


def legacy_grid(fingerprint: Mapping[str, Any]) -> tuple[tuple[float, float, float], str] | None:
    """``(spacing, orientation)`` a model trained without resampling worked in, from its training fingerprint.

    Before the model grid was recorded, preprocessing neither reoriented nor resampled: the
    networks saw their training files voxel for voxel. That is one well-defined grid only when
    every training case had the same spacing (min == max within 0.1 %) and one orientation;
    otherwise (or without a fingerprint) ``None``.
    """
    spacing = fingerprint.get("spacing") if fingerprint else None
    orientations = list(fingerprint.get("orientation") or []) if fingerprint else []
    if not spacing or len(orientations) != 1:
        return None
    low, high = np.asarray(spacing["min"], dtype=float), np.asarray(spacing["max"], dtype=float)
    if low.shape != (3,) or not np.allclose(low, high, rtol=1e-3, atol=0):
        return None
    return tuple(float(v) for v in low), str(orientations[0])  # type: ignore[return-value]
