"""The fast paths of the lesion-wise metrics against their slow definitions.

- ``surfel_table``: the stored surfel normals equal MONAI's table (the source of the data), and the
  brats2023 HD95 no longer imports torch.
- ``nearest.SurfaceIndex``: the grid-shell search (and its k-d tree fallback) equals a plain k-d
  tree nearest-point search (``surface.directed_distances``), for every selection and spacing.
- ``surface``: one-pass surface extraction split by component equals per-component extraction;
  the bit-shift neighbourhood codes equal the 2×2×2 weighted correlation; border voxels equal
  ``mask XOR erode(mask)``.
- ``brats2023._lesions``: the dilated component of a lesion is the lesion dilated on its own.
"""

from __future__ import annotations

import subprocess
import sys

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from bratstune.metrics.brats2023 import _lesions
from bratstune.metrics.components import DILATION_STRUCTURE
from bratstune.metrics.nearest import SurfaceIndex, shells
from bratstune.metrics.surface import ComponentSurfaces, border_points, directed_distances, surfel_points
from bratstune.metrics.surfel_table import surfel_area_table, surfel_normals

SPACINGS = [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5), (0.8, 1.2, 1.5), (2.0, 0.5, 1.0)]


def _blobs(rng, shape, fraction, sigma=1.5):
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sigma)
    return noise > np.quantile(noise, 1 - fraction)


def test_surfel_normals_equal_monai():
    from monai.metrics.utils import _get_neighbour_code_to_normals_table

    monai_table = np.asarray(_get_neighbour_code_to_normals_table().cpu().numpy(), dtype=np.float64)
    ours = surfel_normals()
    assert ours.shape == monai_table.shape == (256, 4, 3)
    np.testing.assert_allclose(ours, monai_table, rtol=0, atol=1e-12)


def test_surfel_area_table_known_values():
    table = surfel_area_table((1.0, 1.0, 1.0))
    assert table[0] == 0.0 and table[255] == 0.0
    # a lone voxel corner cuts one triangle with vertices at the three edge midpoints: area √3/8
    assert table[1] == pytest.approx(np.sqrt(3) / 8, abs=1e-15)
    # half the cube (a flat 1×1 face through the middle): area 1
    assert table[0b00001111] == pytest.approx(1.0, abs=1e-15)


def test_brats2023_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from bratstune.metrics import lesion_wise\n"
        "g = np.zeros((20, 20, 20), np.uint8); g[5:12, 5:12, 5:12] = 3; p = np.roll(g, 1, 0)\n"
        "lesion_wise(p, g, 'GLI', 'brats2023')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("spacing", SPACINGS)
def test_shells_are_complete_and_sorted(spacing):
    groups = shells(spacing, 3.0)
    distances = [d for _, d in groups]
    assert distances[0] == 0.0 and distances == sorted(distances) and len(set(distances)) == len(distances)
    listed = {tuple(int(v) for v in o) for offs, _ in groups for o in offs}
    limit = 3.0 * min(spacing)
    reach = [int(limit / s) + 2 for s in spacing]
    for o in np.ndindex(*[2 * r + 1 for r in reach]):
        off = tuple(v - r for v, r in zip(o, reach))
        inside = np.sqrt(sum((v * s) ** 2 for v, s in zip(off, spacing))) <= limit - 1e-9
        if inside:
            assert off in listed


@pytest.mark.parametrize("spacing", SPACINGS)
def test_surface_index_equals_kd_tree(spacing):
    rng = np.random.default_rng(7)
    shape = (40, 36, 30)
    mask = _blobs(rng, shape, 0.08)
    # far specks: their distances exceed the shell radius and go through the k-d tree
    mask[0, 0, 0] = mask[39, 35, 29] = True
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    surf = ComponentSurfaces(mask, labels, "voxel")
    src = border_points(_blobs(rng, shape, 0.05))
    selections = [None, 1, n, list(range(1, n + 1, 2)), [n, 1]]
    for select in selections:
        if select is None:
            dst = surf.points
        else:
            dst, _ = surf.select([select] if np.ndim(select) == 0 else select)
        expected = directed_distances(src, dst, spacing)
        got = surf.distances_to(src, spacing, select)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_surface_index_empty_selection_is_inf():
    points = np.array([[1, 1, 1]], dtype=np.int64)
    index = SurfaceIndex(points, np.array([1]), (4, 4, 4), (1.0, 1.0, 1.0))
    src = np.array([[3, 3, 3], [0, 0, 0]], dtype=np.int64)
    assert np.all(np.isinf(index.distances(src, 2)))
    np.testing.assert_allclose(index.distances(src, None), [np.sqrt(12), np.sqrt(3)])


def _old_codes(mask):
    padded = np.pad(mask.astype(np.uint8), 1)
    kernel = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)
    return ndimage.correlate(padded, kernel, mode="constant", cval=0)[1:, 1:, 1:]


@pytest.mark.parametrize("seed", range(4))
def test_surface_extraction_matches_definitions(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(3, 25, size=3))
    mask = _blobs(rng, shape, rng.uniform(0.05, 0.4), sigma=1.0)
    mask[0] |= rng.random(mask[0].shape) < 0.2  # touching the array's faces
    codes = _old_codes(mask)
    surface = (codes != 0) & (codes != 255)
    corners, got_codes = surfel_points(mask)
    np.testing.assert_array_equal(corners, np.argwhere(surface))
    np.testing.assert_array_equal(got_codes, codes[surface])
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    np.testing.assert_array_equal(border_points(mask), np.argwhere(mask & ~eroded))

    # one pass split by component == each component on its own
    labels, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
    for kind in ("surfel", "voxel"):
        surf = ComponentSurfaces(mask, labels, kind)
        for cid in range(1, n + 1):
            pts, cc = surf.select([cid])
            if kind == "surfel":
                ref_pts, ref_codes = surfel_points(labels == cid)
                order = np.lexsort(ref_pts.T[::-1])
                np.testing.assert_array_equal(pts, ref_pts[order])
                np.testing.assert_array_equal(cc, ref_codes[order])
            else:
                np.testing.assert_array_equal(pts, border_points(labels == cid))


@pytest.mark.parametrize("dilation", [1, 3])
def test_dilated_component_is_the_dilated_lesion(dilation):
    rng = np.random.default_rng(dilation)
    gt = _blobs(rng, (44, 40, 36), 0.006, sigma=1.0)
    gt[0, :3, :3] = True  # at the array's edge, where the dilation is clipped
    lesions, reach, n = _lesions(gt, dilation)
    assert n > 1
    for lesion_id in range(1, n + 1):
        own = ndimage.binary_dilation(lesions == lesion_id, structure=DILATION_STRUCTURE, iterations=dilation)
        np.testing.assert_array_equal(reach == lesion_id, own)
