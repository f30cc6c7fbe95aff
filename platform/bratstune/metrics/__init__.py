"""Segmentation metrics: BraTS lesion-wise (2023 and 2026 protocols) and legacy.

Entry point: :func:`lesion_wise` (``bratstune.metrics.api``). Building blocks: ``legacy`` (voxel
Dice, IoU, confusion counts), ``surface`` (the two HD95 definitions), ``components`` (connected
components, dilation-merged GT lesions), ``brats2023`` and ``brats2026`` (one region each).
"""

from __future__ import annotations

from bratstune.metrics.api import PROTOCOLS, REGION_NAMES, LesionReference, challenges, lesion_wise, protocol_regions
from bratstune.metrics.legacy import Confusion, confusion, dice, iou, precision, recall, sensitivity, specificity
from bratstune.metrics.surface import hd95_surfel, hd95_voxel, nsd_voxel

__all__ = [
    "PROTOCOLS",
    "REGION_NAMES",
    "Confusion",
    "LesionReference",
    "challenges",
    "confusion",
    "dice",
    "hd95_surfel",
    "hd95_voxel",
    "iou",
    "lesion_wise",
    "nsd_voxel",
    "precision",
    "protocol_regions",
    "recall",
    "sensitivity",
    "specificity",
]
