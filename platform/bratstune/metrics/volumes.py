"""Region volumes and lesion counts of a label map (pure NumPy + cc3d).

:func:`region_stats` gives, for every evaluated region ``R`` of a label scheme, its volume in
millilitres and its number of lesions (26-connected components)::

    {"volume_WT_ml": 41.2, "lesions_WT": 1, "volume_TC_ml": 12.0, "lesions_TC": 2, ...}

Batch prediction writes these columns to ``predictions.csv``; the registered model's pyfunc
returns them per case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bratstune.labels import get_scheme
from bratstune.metrics.components import components, region_mask

__all__ = ["oof_statistics", "oof_statistics_from_rows", "region_stats"]

_QUANTILES = {"p05": 5, "p25": 25, "median": 50, "p75": 75, "p95": 95}


def region_stats(labels: np.ndarray, scheme: Any, spacing: Sequence[float]) -> dict[str, float | int]:
    """``volume_<R>_ml`` and ``lesions_<R>`` for every region ``R`` of ``scheme``."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    out: dict[str, float | int] = {}
    labels = np.ascontiguousarray(labels)
    for region, values in scheme.regions.items():
        mask = region_mask(labels, values)
        out[f"volume_{region}_ml"] = round(float(mask.sum()) * voxel_ml, 3)
        out[f"lesions_{region}"] = components(mask)[1] if mask.any() else 0
    return out


def _summary(values: Sequence[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    out: dict[str, Any] = {"min": float(array.min()), "max": float(array.max())}
    out.update({name: float(np.percentile(array, q)) for name, q in _QUANTILES.items()})
    out["values"] = [round(float(v), 3) for v in array]
    return out


def oof_statistics_from_rows(rows: Iterable[Mapping[str, Any]], scheme: Any) -> dict[str, Any]:
    """:func:`oof_statistics` from per-case ``region_stats`` rows (``volume_<R>_ml``, ``lesions_<R>``)."""
    scheme = get_scheme(scheme)
    rows = list(rows)
    if not rows:
        return {}
    regions = list(scheme.regions)
    return {
        "cases": len(rows),
        "scheme": scheme.name,
        "volume_ml": {r: _summary([float(row[f"volume_{r}_ml"]) for row in rows]) for r in regions},
        "lesions": {r: _summary([float(row[f"lesions_{r}"]) for row in rows]) for r in regions},
    }


def oof_statistics(
    oof_label_maps: Iterable[np.ndarray], spacings: Iterable[Sequence[float]], *, scheme: Any
) -> dict[str, Any]:
    """Distribution of the model's predicted volumes and lesion counts on out-of-fold cases.

    Record it in the package (``Ensemble.from_members(..., oof_statistics=...)``) so that batch
    prediction can compare a new cohort with what the model predicts on data like its training
    data (:func:`cohort_flags`).

    Args:
        oof_label_maps: decoded out-of-fold predictions, uint8 ``(X, Y, Z)`` each, in ``scheme``
            (any grid; consumed one at a time, so a generator keeps memory flat).
        spacings: voxel size (mm) of each label map, in the same order.
        scheme: label scheme of the label maps.

    Returns:
        ``{"cases": n, "scheme": name, "volume_ml": {R: {"min", "p05", "p25", "median", "p75",
        "p95", "max", "values"}}, "lesions": {R: {...}}}`` (empty without cases).
    """
    scheme = get_scheme(scheme)
    rows = [region_stats(labels, scheme, spacing) for labels, spacing in zip(oof_label_maps, spacings, strict=True)]
    return oof_statistics_from_rows(rows, scheme)
