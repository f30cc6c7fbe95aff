"""The faster paths of the lesion-wise metrics give the plain paths' values, float for float.

- ``LesionReference`` (the reference prepared once, a prediction given inside a box) equals
  ``lesion_wise`` on the whole volume.
- ``SurfaceIndex`` on an exact grid (distance maps, the wide shell stage) equals a k-d tree search.
- ``compact.Layout`` (brats2026 on a canvas of packed pieces) equals the unpacked evaluation, and its
  renumbering restores cc3d's numbering of the case.
- ``surface._sorted_pairs`` (one complex sort) equals ``lexsort``.
"""

from __future__ import annotations

import math

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from bratstune.metrics import LesionReference, lesion_wise
from bratstune.metrics import compact as compact_module
from bratstune.metrics.compact import Layout, xy_cut
from bratstune.metrics.components import case_box
from bratstune.metrics.nearest import SurfaceIndex, exact_grid
from bratstune.metrics.surface import _sorted_pairs, directed_distances

EXACT = [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (0.9375, 0.9375, 1.5)]


def _same(a, b, path=""):
    """Equal values (NaN equal to NaN), recursively, with the same keys in the same order."""
    if isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            _same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def _blobs(rng, shape, fraction, sigma=1.5):
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return noise > np.quantile(noise, 1 - fraction)


def _labels(rng, shape, fractions=(0.08, 0.04, 0.02)):
    seg = np.zeros(shape, np.uint8)
    for label, fraction in zip((2, 1, 3), fractions):
        if rng.random() < 0.9:
            seg[_blobs(rng, shape, fraction)] = label
    return seg


def _sparse_case(rng, shape=(64, 60, 52)):
    """Lesions and dust spread over a mostly empty volume: many pieces, in no raster order."""
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        c = [int(rng.integers(8, n - 8)) for n in shape]
        r = int(rng.integers(2, 6))
        box = tuple(slice(v - r, v + r) for v in c)
        gt[box] = rng.integers(1, 4)
        shifted = tuple(slice(v - r + int(rng.integers(-1, 2)), v + r + int(rng.integers(-1, 2))) for v in c)
        pred[shifted] = rng.integers(1, 4)
        pred[c[0], c[1], c[2]] = 3
    for _ in range(int(rng.integers(5, 25))):  # dust
        c = [int(rng.integers(1, n - 3)) for n in shape]
        (pred if rng.random() < 0.7 else gt)[c[0] : c[0] + 2, c[1], c[2] : c[2] + int(rng.integers(1, 3))] = (
            rng.integers(1, 5)
        )
    return pred, gt


# -- LesionReference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_lesion_reference_equals_lesion_wise(seed):
    rng = np.random.default_rng(seed)
    shape = (34, 30, 28)
    gt = _labels(rng, shape)
    spacing = [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 1.2, 2.0), (0.9375, 0.9375, 1.5)][seed % 4]
    challenge = ("GLI", "MET", "MEN")[seed % 3]
    reference = LesionReference(gt, challenge, spacing)
    for trial in range(4):
        pred = _labels(rng, shape) if trial else np.zeros(shape, np.uint8)
        expected = lesion_wise(pred, gt, challenge, "brats2023", spacing, lesions=True)
        _same(reference.evaluate(pred, lesions=True), expected)
        # the prediction given only inside a box that holds it and the dilated reference
        box = case_box(pred, gt, reference.rule.dilation + 1) or ((slice(0, 1),) * 3)
        got = reference.evaluate(np.ascontiguousarray(pred[box]), box, whole_region=False)
        for region, row in expected.items():
            trimmed = {k: v for k, v in row.items() if k not in ("legacy_hd95", "lesions")}
            _same(got[region], trimmed, region)


def test_lesion_reference_refuses_a_box_without_the_reference():
    gt = np.zeros((20, 20, 20), np.uint8)
    gt[8:12, 8:12, 8:12] = 3
    reference = LesionReference(gt, "GLI")
    box = (slice(8, 12), slice(8, 12), slice(8, 12))  # no room for the dilation
    with pytest.raises(ValueError, match="dilated reference"):
        reference.evaluate(np.zeros((4, 4, 4), np.uint8), box)


# -- nearest-point search on an exact grid -----------------------------------------------------------


def test_exact_grid():
    assert exact_grid((1.0, 1.0, 1.0), (240, 240, 155))
    assert exact_grid((0.9375, 0.9375, 1.5), (256, 256, 200))
    assert not exact_grid((1.0, 1.2, 2.0), (64, 64, 64))  # 1.2 has no finite binary expansion
    assert not exact_grid((4.0, 4.0, 4.0), (600, 10, 10))  # 2400 mm wide


@pytest.mark.parametrize("spacing", EXACT)
def test_maps_and_wide_shells_equal_a_kd_tree(spacing):
    rng = np.random.default_rng(3)
    shape = (48, 40, 36)
    mask = _blobs(rng, shape, 0.05)
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    points = np.argwhere(mask)
    ids = labels[mask].astype(np.int64)
    order = np.argsort(ids, kind="stable")
    points, ids = points[order], ids[order]
    near = np.argwhere(_blobs(rng, shape, 0.04))
    far = np.array([[0, 0, 0], [47, 39, 35], [0, 39, 0]], dtype=np.int64)  # beyond every shell
    for maps in (False, True):
        index = SurfaceIndex(points, ids, shape, spacing, maps=maps)
        for select in (1, n, [1, n], None):
            targets = points if select is None else points[np.isin(ids, np.atleast_1d(select))]
            for src in (near[: len(near) // 2], far, near):  # the map grows with the queries
                np.testing.assert_array_equal(index.distances(src, select), directed_distances(src, targets, spacing))


def test_sorted_pairs_equal_lexsort():
    rng = np.random.default_rng(0)
    distances = np.sqrt(rng.integers(0, 50, 2000) * 4.0)
    distances[:5] = np.inf
    areas = rng.choice(rng.random(20), 2000)
    order = np.lexsort((areas, distances))
    got = _sorted_pairs(distances, areas)
    np.testing.assert_array_equal(got[0], distances[order])
    np.testing.assert_array_equal(got[1], areas[order])


# -- brats2026 on a packed canvas ---------------------------------------------------------------------


def test_xy_cut_pieces_hold_the_foreground_apart():
    rng = np.random.default_rng(1)
    pred, gt = _sparse_case(rng)
    mask = (pred != 0) | (gt != 0)
    pieces = xy_cut(mask)
    covered = np.zeros(mask.shape, np.int32)
    for box in pieces:
        covered[box] += 1
        grown = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        ring = mask[grown].copy()
        inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))
        ring[inner] = False
        assert not ring.any()  # nothing of another piece touches this one (26-neighbours)
    assert covered.max() == 1 and np.all(covered[mask] == 1)
    assert len(pieces) > 3


@pytest.mark.parametrize("seed", range(12))
def test_packed_brats2026_equals_the_unpacked_evaluation(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    pred, gt = _sparse_case(rng)
    spacing = EXACT[seed % 3]
    challenge, penalised = [("GLI", False), ("MET", True), ("PED", False)][(seed // 3) % 3]
    assert Layout((pred != 0) | (gt != 0)).worthwhile  # the packed path is the one under test
    packed = lesion_wise(pred, gt, challenge, "brats2026", spacing, lesions=True, penalised=penalised)
    monkeypatch.setattr(compact_module.Layout, "worthwhile", property(lambda self: False))
    plain = lesion_wise(pred, gt, challenge, "brats2026", spacing, lesions=True, penalised=penalised)
    _same(packed, plain)


def test_renumbering_restores_the_case_numbering():
    rng = np.random.default_rng(5)
    pred, _ = _sparse_case(rng)
    mask = pred != 0
    layout = Layout(mask)
    expected, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    canvas, m = cc3d.connected_components(layout.pack(mask), connectivity=26, return_N=True)
    assert m == n > 5
    renumbered = layout.renumber(canvas, m)
    for box, place in zip(layout.pieces, layout.places):
        np.testing.assert_array_equal(renumbered[place], expected[box])


@pytest.mark.parametrize("spacing", EXACT)
def test_exact_sort_of_surface_distances_equals_the_float_sort(spacing):
    from bratstune.metrics.nearest import offset_distance
    from bratstune.metrics.surface import SurfaceDistances

    rng = np.random.default_rng(2)
    sampling = np.asarray(spacing)
    to_pred = offset_distance(rng.integers(-30, 31, (3000, 3)), sampling)
    to_gt = offset_distance(rng.integers(-3, 4, (2000, 3)), sampling)
    codes_g, codes_p = rng.integers(1, 255, 3000), rng.integers(1, 255, 2000)
    fast = SurfaceDistances.from_codes(to_pred, codes_g, to_gt, codes_p, spacing, exact=True)
    slow = SurfaceDistances.from_codes(to_pred, codes_g, to_gt, codes_p, spacing, exact=False)
    for name in ("gt_to_pred", "gt_areas", "pred_to_gt", "pred_areas"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
    assert fast.robust_hausdorff(95.0) == slow.robust_hausdorff(95.0)
