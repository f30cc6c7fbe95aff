"""Connected components, region masks and boxes shared by the lesion-wise protocols.

Every function works on C-ordered arrays: cc3d numbers components in the order of their first
voxel in a C-order raster scan, and both protocols rely on that order only for tie-breaking, which
then matches the reference implementations (which also run cc3d on C-ordered arrays).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cc3d
import numpy as np
from scipy import ndimage

__all__ = [
    "DILATION_STRUCTURE",
    "case_box",
    "component_sizes",
    "components",
    "dilate",
    "dilation_merged_lesions",
    "expand",
    "object_boxes",
    "region_mask",
    "union_box",
]

# 18-neighbour structure of the BraTS 2023 lesion dilation: generate_binary_structure(3, 2)
DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)

Box = tuple[slice, slice, slice]


def region_mask(seg: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of ``values``.

    A contiguous range ``a..b`` is one unsigned comparison ``(seg − a) ≤ (b − a)``; other sets are
    an OR of equalities (both several times faster than a lookup-table gather).
    """
    values = sorted({int(v) for v in values})
    if not values:
        return np.zeros(seg.shape, dtype=bool)
    low, high = values[0], values[-1]
    if np.issubdtype(seg.dtype, np.unsignedinteger) and high - low + 1 == len(values):
        if len(values) == 1:
            return seg == seg.dtype.type(low)
        return (seg - seg.dtype.type(low)) <= seg.dtype.type(high - low)
    mask = seg == values[0]
    for v in values[1:]:
        mask |= seg == v
    return mask


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean mask: ``(labels uint32, count)``, labels 1..count."""
    # as uint8: cc3d labels a boolean line (shape like (3, 1, 1), a case of two 1-voxel pieces on a
    # packed canvas) wrongly and raises; the uint8 path gives the same labels for every other shape
    labels, n = cc3d.connected_components(
        np.ascontiguousarray(mask, dtype=bool).view(np.uint8), connectivity=26, return_N=True
    )
    return labels, int(n)


def component_sizes(labels: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of each label 0..n (index 0 is unused and 0), from the foreground voxels only."""
    sizes = np.bincount(labels[mask], minlength=n + 1)
    sizes[0] = 0
    return sizes


def object_boxes(labels: np.ndarray, n: int) -> list[Box]:
    """Bounding box of each label 1..n (``scipy.ndimage.find_objects``); every label must be present."""
    boxes = ndimage.find_objects(labels, max_label=n)
    return [b for b in boxes]  # type: ignore[misc]


def expand(box: Box, pad: int, shape: Sequence[int]) -> Box:
    """``box`` grown by ``pad`` voxels on every side, clipped to the array ``shape``."""
    return tuple(  # type: ignore[return-value]
        slice(max(s.start - pad, 0), min(s.stop + pad, int(n))) for s, n in zip(box, shape)
    )


def union_box(boxes: Iterable[Box]) -> Box:
    """Smallest box that contains every box of ``boxes`` (at least one)."""
    boxes = list(boxes)
    return tuple(  # type: ignore[return-value]
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)
    )


def case_box(pred: np.ndarray, gt: np.ndarray, pad: int) -> Box | None:
    """Box of all foreground of a case (``pred > 0 | gt > 0``) grown by ``pad``; ``None`` if both empty."""
    boxes = []
    for seg in (pred, gt):
        box = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            nz = np.flatnonzero(seg.any(axis=other))
            if nz.size == 0:
                box = None
                break
            box.append(slice(int(nz[0]), int(nz[-1]) + 1))
        if box is not None:
            boxes.append(tuple(box))
    if not boxes:
        return None
    return expand(union_box(boxes), pad, pred.shape)


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary dilation by the 18-neighbour structure, ``iterations`` times (outside = background)."""
    if iterations <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=DILATION_STRUCTURE, iterations=iterations)


def dilation_merged_lesions(gt: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """BraTS 2023 ground-truth lesions: components of the dilated mask, restricted to original voxels.

    The ground-truth mask is dilated ``dilation`` times by the 18-neighbour structure; its
    26-connected components define the lesions, and every original voxel takes the id of the
    component it falls in, so GT parts closer than about ``2·dilation`` voxels form one lesion made
    only of original voxels. Every id 1..n labels at least one voxel.

    Returns:
        ``(lesions, n)``: uint32 array with lesion ids on the original GT voxels, and their count.
    """
    if not gt.any():
        return np.zeros(gt.shape, dtype=np.uint32), 0
    dilated_labels, n = components(dilate(gt, dilation))
    lesions = np.where(gt, dilated_labels, 0).astype(np.uint32, copy=False)
    return lesions, n
