"""Compaction of a sparse case: the boxes of its foreground packed side by side on a small canvas.

A full-size case is mostly background, and false-positive dust spreads its foreground over the
whole brain, so the box of all foreground is nearly the volume (~4·10⁶ voxels) while the
foreground fills a few percent of it. Every pass of the brats2026 evaluation (connected components,
border voxels, masks) pays for the box, six regions times two arrays.

:class:`Layout` cuts the box recursively at empty planes (an XY-cut: along any axis, a run of planes
without foreground splits the box; each part is trimmed and cut again) into *pieces*: disjoint
boxes that hold all the foreground, where every voxel just outside a piece is background and no
voxel of one piece is 26-adjacent to another (an empty plane lies between). The pieces are copied
side by side along axis 0 onto a *canvas*, one empty plane apart. On the canvas:

* connected components (26-) are the case's, piece by piece, and voxel counts and overlaps are
  the same;
* border voxels (6-neighbour) are the same, and so are distances between points of one piece;
* only two things differ, and :class:`Layout` puts them back: component numbers (cc3d numbers in
  raster order of the first voxel; :meth:`Layout.renumber` restores the case's raster order), and
  positions across pieces (:meth:`Layout.to_case` maps canvas points back, for whole-region
  distances).

Cut in half a dozen passes over the box; each later pass then costs the canvas, not the box.
"""

from __future__ import annotations

import numpy as np

from bratstune.metrics.components import Box

__all__ = ["Layout", "xy_cut"]


def xy_cut(mask: np.ndarray) -> list[Box]:
    """Disjoint boxes holding every voxel of ``mask``, split and trimmed at empty planes.

    Returns:
        The boxes (in ``mask``'s coordinates) in a fixed order; ``[]`` when ``mask`` is empty.
    """
    out: list[Box] = []
    todo: list[Box] = [tuple(slice(0, int(n)) for n in mask.shape)]  # type: ignore[list-item]
    while todo:
        box = todo.pop()
        sub = mask[box]
        profiles = [sub.any(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
        if not profiles[0].any():
            continue
        trimmed = []
        for axis, profile in enumerate(profiles):
            nz = np.flatnonzero(profile)
            trimmed.append(slice(box[axis].start + int(nz[0]), box[axis].start + int(nz[-1]) + 1))
        split = False
        for axis, profile in enumerate(profiles):
            lo = int(np.flatnonzero(profile)[0])
            inner = profile[lo : lo + trimmed[axis].stop - trimmed[axis].start]
            gaps = np.flatnonzero(~inner)
            if gaps.size == 0:
                continue
            # runs of non-empty planes between the empty ones
            starts = np.flatnonzero(inner & ~np.concatenate(([False], inner[:-1])))
            stops = np.flatnonzero(inner & ~np.concatenate((inner[1:], [False]))) + 1
            for a, b in zip(starts.tolist()[::-1], stops.tolist()[::-1]):
                part = list(trimmed)
                part[axis] = slice(trimmed[axis].start + a, trimmed[axis].start + b)
                todo.append(tuple(part))  # type: ignore[arg-type]
            split = True
            break
        if not split:
            out.append(tuple(trimmed))  # type: ignore[arg-type]
    out.sort(key=lambda b: (b[0].start, b[1].start, b[2].start))
    return out


def _shelves(sizes: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Places for boxes of ``sizes`` on a canvas, one empty voxel apart on every axis.

    The canvas is as wide (axes 1, 2) as the widest box; boxes go, thickest first, into slabs along
    axis 0, and inside a slab onto shelves (rows along axis 1, boxes side by side along axis 2), so
    that small pieces (dust) share a slab instead of each taking a plane of the largest's width.

    Returns:
        The corner of each box on the canvas, and the canvas shape.
    """
    if not sizes:
        return [], (1, 1, 1)
    wide = (max(s[1] for s in sizes), max(s[2] for s in sizes))
    corners: list[tuple[int, int, int]] = [(0, 0, 0)] * len(sizes)
    slab_x = slab_t = 0  # current slab: start and thickness along axis 0
    shelf_y = shelf_h = 0  # current shelf: start and height along axis 1
    cursor_z = 0
    started = False
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i][0], -sizes[i][1], -sizes[i][2])):
        x, y, z = sizes[index]
        if started and cursor_z + z > wide[1]:  # next shelf
            shelf_y, shelf_h, cursor_z = shelf_y + shelf_h + 1, 0, 0
        if not started or shelf_y + y > wide[0]:  # next slab
            slab_x, slab_t = (slab_x + slab_t + 1 if started else 0), x
            shelf_y, shelf_h, cursor_z = 0, 0, 0
            started = True
        corners[index] = (slab_x, shelf_y, cursor_z)
        shelf_h = max(shelf_h, y)
        cursor_z += z + 1
    return corners, (slab_x + slab_t, wide[0], wide[1])


class Layout:
    """Pieces of a case (:func:`xy_cut` of ``mask``) and their places on a canvas.

    Args:
        mask: boolean ``(X, Y, Z)``, the foreground of every array to be packed.
    """

    def __init__(self, mask: np.ndarray) -> None:
        self.shape = tuple(int(n) for n in mask.shape)
        self.pieces = xy_cut(mask)
        sizes = [tuple(s.stop - s.start for s in box) for box in self.pieces]
        corners, self.canvas_shape = _shelves(sizes)
        self.places = [tuple(slice(c, c + n) for c, n in zip(corner, size)) for corner, size in zip(corners, sizes)]
        # canvas position -> case position: the shift of the piece that owns the canvas voxel
        self.shifts = np.array(
            [[b.start - c for b, c in zip(box, corner)] for box, corner in zip(self.pieces, corners)], dtype=np.int64
        ).reshape(-1, 3)
        self.owner = np.full(self.canvas_shape, -1, dtype=np.int32)
        for index, place in enumerate(self.places):
            self.owner[place] = index

    @property
    def worthwhile(self) -> bool:
        """Whether the canvas is much smaller than the case (else packing costs more than it saves)."""
        return int(np.prod(self.canvas_shape)) * 4 <= int(np.prod(self.shape))

    def pack(self, array: np.ndarray) -> np.ndarray:
        """``array`` ``(X, Y, Z)`` (the case's shape) laid out on the canvas (zeros between pieces)."""
        out = np.zeros(self.canvas_shape, dtype=array.dtype)
        for box, place in zip(self.pieces, self.places):
            out[place] = array[box]
        return out

    def to_case(self, points: np.ndarray) -> np.ndarray:
        """Canvas points ``(N, 3)`` (voxels of the pieces) -> the same points in the case."""
        if points.shape[0] == 0:
            return points
        return points + self.shifts[self.owner[points[:, 0], points[:, 1], points[:, 2]]]

    def renumber(self, labels: np.ndarray, n: int) -> np.ndarray:
        """Component labels of a canvas (1..n, cc3d's canvas raster order) renumbered in the order
        of their first voxel in the case's raster scan, as cc3d would have numbered them there.

        A component lies in one piece, and a piece keeps the case's raster order on the canvas,
        so its first voxel on the canvas is its first voxel in the case, shifted.
        """
        if n <= 1:
            return labels
        # first voxel of each label on the canvas: labels first appear in the order 1, 2, ..., n,
        # so label k first appears where the running maximum of the labels met in a scan reaches k
        where = np.flatnonzero(labels)
        seen = np.maximum.accumulate(labels.ravel()[where])
        flat = where[np.searchsorted(seen, np.arange(1, n + 1))]
        points = np.stack(np.unravel_index(flat, labels.shape), axis=1).astype(np.int64)
        dims = np.array([self.shape[1] * self.shape[2], self.shape[2], 1], dtype=np.int64)
        first = self.to_case(points) @ dims
        order = np.argsort(first, kind="stable")
        if np.all(order[1:] > order[:-1]):
            return labels
        lut = np.zeros(n + 1, dtype=labels.dtype)
        lut[order + 1] = np.arange(1, n + 1, dtype=labels.dtype)
        return lut[labels]
