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

Distance maps (``maps=True``, for an index that many queries reuse, e.g. a reference scored against
hundreds of predictions): a query of one component id reads a map of squared distances to that
component's points, computed once with ``scipy.ndimage.distance_transform_edt`` (feature transform)
over the box of the points and the queries, and grown when a query falls outside it. Maps are used
only on an *exact grid* (:func:`exact_grid`: every spacing a multiple of 1/16 mm, the frame at most
2048 mm wide): there every scaled offset is a multiple of 1/16, every squared distance a multiple
of 1/256 below 2³², and the products in the feature transform stay below 2⁵³ at that resolution,
so all of them are exact. The nearest point is then the true nearest for the EDT, the shell search
and the k-d tree alike (ties have equal distances), and the map returns the same floats.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["DEFAULT_RADIUS", "SurfaceIndex", "exact_grid", "offset_distance", "shells"]

# ball radius of the shell search, in units of the smallest spacing: ~120 offsets, which cover
# nearly all points of a reasonable segmentation; the rest are cheaper in the k-d tree
DEFAULT_RADIUS = 3.0
# on an exact grid (every method returns the same floats, see ``exact_grid``) the few points left
# beyond that ball continue in a wider one (~2000 offsets) when that is cheaper than building a
# k-d tree over the targets (``_WIDE_COST`` gathers per target point)
WIDE_RADIUS = 8.0
_WIDE_COST = 50
# many targets, few queries (on an exact grid): a k-d tree over the targets that can be nearest
# (``SurfaceIndex._near_targets``), sized from a tree over every ``_NEAR_SAMPLE``-th target
_NEAR_MIN = 20_000
_NEAR_SAMPLE = 32


def offset_distance(offsets: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Euclidean length (mm) of integer offsets ``(N, 3)``, summed in EDT order ``(a + b) + c``."""
    scaled = offsets.astype(np.float64) * sampling
    np.multiply(scaled, scaled, out=scaled)
    return np.sqrt((scaled[:, 0] + scaled[:, 1]) + scaled[:, 2])


_MAP_SCALE = 256.0  # squared distances on an exact grid are multiples of 1/256 mm²
_MAP_SLACK = 8  # voxels added around a grown map, so that a few more queries fit without a rebuild


def exact_grid(spacing: Sequence[float], frame: Sequence[int]) -> bool:
    """Whether every squared distance on this grid is exact in float64 (see the module docstring)."""
    sampling = [float(s) for s in spacing]
    multiples = all(s > 0 and s * 16.0 == round(s * 16.0) for s in sampling)
    return multiples and max(int(n) * s for n, s in zip(frame, sampling)) <= 2048.0


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


class _Plan(NamedTuple):
    """The shells of one index: all offsets, where each shell ends, its distance, the search pad."""

    offsets: np.ndarray
    cuts: list[int]
    distances: tuple[float, ...]
    narrow: int  # shells of the first stage (``radius``); the rest is the wide stage
    wide_size: int
    pad: np.ndarray


@functools.lru_cache(maxsize=16)
def _plan(spacing: tuple[float, float, float], radius: float, exact: bool) -> _Plan:
    narrow = shells(spacing, radius)
    last = narrow[-1][1]
    wide = tuple(g for g in shells(spacing, max(WIDE_RADIUS, radius)) if g[1] > last) if exact else ()
    groups = narrow + wide
    offsets = np.concatenate([o for o, _ in groups])
    cuts = [0, *np.cumsum([o.shape[0] for o, _ in groups]).tolist()]
    pad = np.max(np.abs(offsets), axis=0).astype(np.int64)
    return _Plan(offsets, cuts, tuple(d for _, d in groups), len(narrow), sum(o.shape[0] for o, _ in wide), pad)


def _bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box ``[lo, hi)`` of non-empty points ``(N, 3)``, column by column (an axis-0 reduction of a
    narrow array is ~15× slower)."""
    lo = np.array([points[:, a].min() for a in range(3)], dtype=np.int64)
    hi = np.array([points[:, a].max() for a in range(3)], dtype=np.int64) + 1
    return lo, hi


def _shell_search(volume, shell_lin, test, todo: np.ndarray, lin: np.ndarray, out: np.ndarray):
    """Shell by shell (nearest first), write the distance of every point of ``todo`` whose shell
    holds a selected target into ``out``; return the points left (index and linear position)."""
    for offsets, distance in shell_lin:
        if todo.size == 0:
            break
        hit = test(volume[lin[:, None] + offsets[None, :]]).any(axis=1)
        if hit.any():
            out[todo[hit]] = distance
            miss = ~hit
            todo, lin = todo[miss], lin[miss]
    return todo, lin


class SurfaceIndex:
    """Surface points of several components, searchable for exact nearest distances.

    Args:
        points: ``(N, 3)`` int64 grid points, sorted by ``ids``.
        ids: ``(N,)`` component id (≥ 1) of each point.
        frame: shape of the grid the points live in (each coordinate in ``[0, frame)``); query
            points must live in it too.
        spacing: voxel size (mm).
        radius: ball radius of the shell search, in units of the smallest spacing.
        maps: answer one-id queries from cached distance maps (on an exact grid; see the module
            docstring); pays off when the index serves many queries.
    """

    def __init__(
        self,
        points: np.ndarray,
        ids: np.ndarray,
        frame: Sequence[int],
        spacing: Sequence[float],
        *,
        radius: float = DEFAULT_RADIUS,
        maps: bool = False,
    ) -> None:
        self.spacing = tuple(float(s) for s in spacing)
        self.frame = tuple(int(n) for n in frame)
        exact = self._exact = exact_grid(self.spacing, self.frame)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = {} if maps and exact else None
        self.sampling = np.asarray(self.spacing, dtype=np.float64)
        self.points = points
        self.ids = np.asarray(ids, dtype=np.int64)
        plan = _plan(self.spacing, float(radius), exact)
        self._pad = plan.pad
        shape = tuple(int(n) + 2 * int(p) for n, p in zip(frame, self._pad))
        self._strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
        # a volume of component ids (0 = no point) sized to the frame plus the search pad, in the
        # narrowest dtype: it is mostly untouched zero pages, and fewer pages fault in when written
        top = int(self.ids.max(initial=0))
        dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
        self._volume = np.zeros(int(np.prod(shape)), dtype=dtype)
        if points.shape[0]:
            self._volume[self._linear(points)] = self.ids
        # every offset linearised in one product, then cut into the shells
        flat = plan.offsets @ self._strides
        linear = [flat[a:b] for a, b in zip(plan.cuts[:-1], plan.cuts[1:])]
        self._shell_lin = list(zip(linear[: plan.narrow], plan.distances[: plan.narrow]))
        self._wide_lin = list(zip(linear[plan.narrow :], plan.distances[plan.narrow :]))
        self._wide_size = plan.wide_size
        self._trees: dict[object, tuple[cKDTree, np.ndarray]] = {}

    def _linear(self, points: np.ndarray) -> np.ndarray:
        s0, s1, _ = self._strides.tolist()
        p0, p1, p2 = self._pad.tolist()
        return (points[:, 0] + p0) * s0 + (points[:, 1] + p1) * s1 + (points[:, 2] + p2)

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
        if self._maps is not None and select is not None and np.ndim(select) == 0:
            return self._map_distances(src, int(select))  # type: ignore[arg-type]
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
        todo, lin = _shell_search(self._volume, self._shell_lin, test, todo, lin, out)
        if todo.size and todo.size * self._wide_size <= _WIDE_COST * self.points.shape[0]:
            todo, lin = _shell_search(self._volume, self._wide_lin, test, todo, lin, out)
        if todo.size:
            out[todo] = self._tree_distances(src[todo], select)
        return out

    def _map_distances(self, src: np.ndarray, select: int) -> np.ndarray:
        """Distances read from the distance map of component ``select`` (built or grown on need)."""
        lo, hi = _bounds(src)
        entry = self._maps.get(select, False)  # type: ignore[union-attr]
        if entry is not None and (entry is False or (lo < entry[0]).any() or (hi > entry[1]).any()):
            entry = self._maps[select] = self._build_map(select, lo, hi, entry or None)  # type: ignore[index]
        if entry is None:  # no point of that component
            return np.full(src.shape[0], np.inf)
        origin, _, squared = entry
        local = src - origin
        return np.sqrt(squared[local[:, 0], local[:, 1], local[:, 2]] / _MAP_SCALE)

    def _build_map(self, select: int, lo: np.ndarray, hi: np.ndarray, old) -> tuple | None:
        """Squared distances (1/256 mm², uint32) to the points of ``select`` over a box holding them,
        ``[lo, hi)`` and the old map's box, plus some slack."""
        targets = self._targets(select)
        if targets.shape[0] == 0:
            return None
        target_lo, target_hi = _bounds(targets)
        lo, hi = np.minimum(lo, target_lo), np.maximum(hi, target_hi)
        if old is not None:
            lo, hi = np.minimum(lo, old[0]), np.maximum(hi, old[1])
        lo = np.maximum(lo - _MAP_SLACK, 0)
        hi = np.minimum(hi + _MAP_SLACK, np.maximum(np.asarray(self.frame), hi))
        free = np.ones(tuple(int(n) for n in hi - lo), dtype=bool)
        local = targets - lo
        free[local[:, 0], local[:, 1], local[:, 2]] = False
        nearest = ndimage.distance_transform_edt(
            free, sampling=self.sampling, return_distances=False, return_indices=True
        )
        squared = np.zeros(free.shape, dtype=np.float64)
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = free.shape[axis]
            step = (nearest[axis] - np.arange(free.shape[axis]).reshape(shape)) * self.sampling[axis]
            squared += step * step
        return lo, hi, np.rint(squared * _MAP_SCALE).astype(np.uint32)

    def _tree_distances(self, src: np.ndarray, select: int | Sequence[int] | None) -> np.ndarray:
        """k-d tree nearest distances for the points the shell search left (all beyond its ball)."""
        key = None if select is None else (int(select) if np.ndim(select) == 0 else tuple(int(i) for i in select))
        if key not in self._trees:
            dst = self._targets(select)
            if self._exact and dst.shape[0] >= _NEAR_MIN and dst.shape[0] >= 8 * src.shape[0]:
                near = self._near_targets(src, dst)
                if near is not None:  # a tree over the targets that can be nearest, for these queries only
                    tree = cKDTree(near * self.sampling, balanced_tree=False, compact_nodes=False)
                    _, nearest = tree.query(src * self.sampling, k=1)
                    return offset_distance(near[nearest] - src, self.sampling)
            # unbalanced, non-compact: several times faster to build, and the tree serves few queries
            tree = cKDTree(dst * self.sampling, balanced_tree=False, compact_nodes=False) if dst.shape[0] else None
            self._trees[key] = (tree, dst)  # type: ignore[assignment]
        tree, dst = self._trees[key]
        if tree is None:
            return np.full(src.shape[0], np.inf)
        _, nearest = tree.query(src * self.sampling, k=1)
        return offset_distance(dst[nearest] - src, self.sampling)

    def _near_targets(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray | None:
        """The targets inside the box of ``src`` grown by an upper bound of every nearest distance,
        or ``None`` when that is most of them.

        The bound is the largest distance from a query to its nearest point of a sample of the
        targets (a target, so no nearer than the nearest). Only on an exact grid: there any exact
        nearest point gives the same float, whichever a smaller tree returns among equals.
        """
        sample = dst[::_NEAR_SAMPLE]
        bound, _ = cKDTree(sample * self.sampling, balanced_tree=False, compact_nodes=False).query(
            src * self.sampling, k=1
        )
        reach = np.ceil(float(bound.max()) / self.sampling).astype(np.int64) + 1
        lo, hi = _bounds(src)
        lo, hi = lo - reach, hi - 1 + reach
        inside = np.all((dst >= lo) & (dst <= hi), axis=1)
        return dst[inside] if np.count_nonzero(inside) * 2 <= dst.shape[0] else None
