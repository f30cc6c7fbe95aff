"""Region volumes and lesion counts of a label map (pure NumPy + cc3d).

:func:`region_stats` gives, for every evaluated region ``R`` of a label scheme, its volume in
millilitres and its number of lesions (26-connected components)::

    {"volume_WT_ml": 41.2, "lesions_WT": 1, "volume_TC_ml": 12.0, "lesions_TC": 2, ...}

Batch prediction writes these columns to ``predictions.csv``; the registered model's pyfunc
returns them per case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bratstune.metrics.components import components, region_mask

__all__ = ["region_stats"]


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
