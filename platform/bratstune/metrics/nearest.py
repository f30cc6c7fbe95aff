"""Exact nearest-surface-point distances on the voxel grid: a dense shell search, k-d tree fallback.

Surface points (border voxels, surfel corners) are integer grid points, and most of them lie within
a voxel or two of the other mask's surface (a segmentation is mostly right). A k-d tree pays
``O(log M)`` per query and its build for every set it searches; here the target points are written,
with their component id, into one dense volume, and a query point looks at its grid neighbours
``q + o`` shell by shell in increasing distance ``|o·s|`` (``s`` the spacing). The first shell with a
target point gives the exact nearest distance, because every offset of a smaller distance has been
tried. Only points with no target inside the searched ball (distance > ``radius``) go to a k-d tree
over the target points, built on first need and kept for the next query of the same selection.

Distances are ``sqrt((Δ0·s0)² + (Δ1·s1)² + (Δ2·s2)²)`` of the integer offset, the arithmetic of
``surface.directed_distances`` and of ``scipy.ndimage.distance_transform_edt``, so both paths return
the same float for the same nearest offset.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["DEFAULT_RADIUS", "SurfaceIndex", "offset_distance", "shells"]

# ball radius of the shell search, in units of the smallest spacing: ~120 offsets, which cover
# nearly all points of a reasonable segmentation; the rest are cheaper in the k-d tree
DEFAULT_RADIUS = 3.0


def offset_distance(offsets: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Euclidean length (mm) of integer offsets ``(N, 3)``, summed in EDT order ``(a + b) + c``."""
    scaled = offsets.astype(np.float64) * sampling
    np.multiply(scaled, scaled, out=scaled)
    return np.sqrt((scaled[:, 0] + scaled[:, 1]) + scaled[:, 2])


@functools.lru_cache(maxsize=16)
def shells(spacing: tuple[float, float, float], radius: float) -> tuple[tuple[np.ndarray, float], ...]:
    """Integer offsets with ``|o·s| ≤ radius·min(s)``, grouped by equal distance, nearest first.

    The ball is complete: every integer offset of smaller (float) distance than the last shell is
    listed, so a hit in a shell is the exact minimum. The box enumerated is one voxel wider than the
    ball on every axis, so no offset is lost to rounding at the rim.

    Returns:
        ``((offsets (m, 3) int64, distance), ...)`` in increasing distance, starting with ``(0,0,0)``.
    """
    sampling = np.asarray(spacing, dtype=np.float64)
    limit = float(radius) * float(sampling.min())
    reach = [int(np.floor(limit / s)) + 1 for s in sampling]
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), axis=-1).reshape(-1, 3)
    dist = offset_distance(grid, sampling)
    keep = dist <= limit
    grid, dist = grid[keep], dist[keep]
    order = np.argsort(dist, kind="stable")
    grid, dist = grid[order], dist[order]
    cuts = np.flatnonzero(np.diff(dist)) + 1
    out = []
    for offs, d in zip(np.split(grid, cuts), np.split(dist, cuts)):
        offs = offs.astype(np.int64)
        offs.setflags(write=False)
        out.append((offs, float(d[0])))
    return tuple(out)


class SurfaceIndex:
    """Surface points of several components, searchable for exact nearest distances.

    Args:
        points: ``(N, 3)`` int64 grid points, sorted by ``ids``.
        ids: ``(N,)`` component id (≥ 1) of each point.
        frame: shape of the grid the points live in (each coordinate in ``[0, frame)``); query
            points must live in it too.
        spacing: voxel size (mm).
        radius: ball radius of the shell search, in units of the smallest spacing.
    """

    def __init__(
        self,
        points: np.ndarray,
        ids: np.ndarray,
        frame: Sequence[int],
        spacing: Sequence[float],
        *,
        radius: float = DEFAULT_RADIUS,
    ) -> None:
        self.spacing = tuple(float(s) for s in spacing)
        self.sampling = np.asarray(self.spacing, dtype=np.float64)
        self.points = points
        self.ids = np.asarray(ids, dtype=np.int64)
        self._shells = shells(self.spacing, float(radius))
        pad = np.max(np.abs(np.concatenate([o for o, _ in self._shells])), axis=0)
        self._pad = pad.astype(np.int64)
        shape = tuple(int(n) + 2 * int(p) for n, p in zip(frame, pad))
        self._strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
        # a volume of component ids (0 = no point) sized to the frame plus the search pad, in the
        # narrowest dtype: it is mostly untouched zero pages, and fewer pages fault in when written
        top = int(self.ids.max(initial=0))
        dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
        self._volume = np.zeros(int(np.prod(shape)), dtype=dtype)
        if points.shape[0]:
            self._volume[self._linear(points)] = self.ids
        self._shell_lin = [(offs @ self._strides, d) for offs, d in self._shells]
        self._trees: dict[object, tuple[cKDTree, np.ndarray]] = {}

    def _linear(self, points: np.ndarray) -> np.ndarray:
        return (points + self._pad) @ self._strides

    def _targets(self, select: int | Sequence[int] | None) -> np.ndarray:
        if select is None:
            return self.points
        wanted = np.isin(self.ids, np.atleast_1d(np.asarray(select, dtype=np.int64)))
        return self.points[wanted]

    def distances(self, src: np.ndarray, select: int | Sequence[int] | None = None) -> np.ndarray:
        """Distance (mm) of each point of ``src`` ``(N, 3)`` to the nearest selected target point.

        Args:
            src: int64 query points in the frame.
            select: ``None`` (all targets), one component id, or a sequence of ids.

        Returns:
            float64 ``(N,)``; ``+inf`` for every point when no target is selected.
        """
        n = src.shape[0]
        out = np.empty(n, dtype=np.float64)
        if n == 0:
            return out
        if select is None:

            def test(values: np.ndarray) -> np.ndarray:
                return values != 0
        elif np.ndim(select) == 0:
            wanted_id = int(select)  # type: ignore[arg-type]

            def test(values: np.ndarray) -> np.ndarray:
                return values == wanted_id
        else:
            lut = np.zeros(int(self.ids.max(initial=0)) + 1, dtype=bool)
            chosen = np.asarray(select, dtype=np.int64)
            lut[chosen[chosen < lut.size]] = True

            def test(values: np.ndarray) -> np.ndarray:
                return lut[values]

        todo = np.arange(n)
        lin = self._linear(src)
        for offsets, distance in self._shell_lin:
            values = self._volume[lin[:, None] + offsets[None, :]]
            hit = test(values).any(axis=1)
            if hit.any():
                out[todo[hit]] = distance
                miss = ~hit
                todo, lin = todo[miss], lin[miss]
                if todo.size == 0:
                    return out
        out[todo] = self._tree_distances(src[todo], select)
        return out

    def _tree_distances(self, src: np.ndarray, select: int | Sequence[int] | None) -> np.ndarray:
        """k-d tree nearest distances for the points the shell search left (all beyond its ball)."""
        key = None if select is None else (int(select) if np.ndim(select) == 0 else tuple(int(i) for i in select))
        if key not in self._trees:
            dst = self._targets(select)
            # unbalanced, non-compact: several times faster to build, and the tree serves few queries
            tree = cKDTree(dst * self.sampling, balanced_tree=False, compact_nodes=False) if dst.shape[0] else None
            self._trees[key] = (tree, dst)  # type: ignore[assignment]
        tree, dst = self._trees[key]
        if tree is None:
            return np.full(src.shape[0], np.inf)
        _, nearest = tree.query(src * self.sampling, k=1)
        return offset_distance(dst[nearest] - src, self.sampling)
