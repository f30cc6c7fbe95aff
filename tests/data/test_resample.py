"""The model grid: reorientation + resampling to a target spacing, and the exact way back."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from bratstune.config_utils import from_dict
from bratstune.data.fingerprint import legacy_grid, training_fingerprint
from bratstune.data.preprocess import PreprocessConfig, preprocess_case, uncrop
from bratstune.data.resample import (
    check_orientation,
    median_spacing,
    plan_grid,
    reoriented_spacing,
    resample_world,
    to_input_grid,
    to_model_grid,
)
from bratstune.errors import ConfigError

LPS = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 100], [0, 0, 1.0, -40], [0, 0, 0, 1]])


def _affine(spacing, base=LPS):
    return base @ np.diag([*spacing, 1.0])


def _world_linear(affine, shape):
    """A field linear in world coordinates: any correct resampling reproduces it exactly (inside)."""
    ijk = np.indices(shape).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return (0.3 * xyz[0] - 0.2 * xyz[1] + 0.1 * xyz[2]).reshape(shape).astype(np.float32)


@pytest.mark.parametrize(
    ("spacing", "shape", "target", "expected_shape"),
    [
        ((2.0, 2.0, 2.0), (40, 44, 30), (2.0, 2.0, 2.0), (40, 44, 30)),  # same spacing: reorient only
        ((1.0, 1.0, 1.0), (80, 88, 60), (2.0, 2.0, 2.0), (40, 44, 30)),
        ((0.5, 0.5, 6.0), (160, 176, 10), (2.0, 2.0, 2.0), (40, 44, 30)),
        ((1.0, 1.0, 1.0), (81, 88, 61), (2.0, 2.0, 2.0), (40, 44, 30)),  # round(n * s / t)
    ],
)
def test_plan_grid_shapes_spacing_and_orientation(spacing, shape, target, expected_shape):
    grid = plan_grid(shape, _affine(spacing), target_spacing=target)
    assert grid.shape == expected_shape
    assert np.allclose(grid.spacing, target)
    assert nib.aff2axcodes(grid.affine) == ("R", "A", "S")
    assert grid.resampled == (spacing != target)
    # the field of view stays centred: the grid centres coincide in world coordinates
    centre = lambda aff, n: aff[:3, :3] @ ((np.asarray(n) - 1) / 2) + aff[:3, 3]  # noqa: E731
    assert np.allclose(centre(grid.affine, grid.shape), centre(_affine(spacing), shape))


def test_model_grid_is_exact_in_world_coordinates():
    shape, affine = (60, 70, 12), _affine((1.0, 1.0, 5.0))
    grid = plan_grid(shape, affine, target_spacing=(2.0, 2.0, 2.0))
    field = _world_linear(affine, shape)
    forward = to_model_grid(field, grid, order=1)
    expected = _world_linear(grid.affine, grid.shape)
    inner = (slice(2, -2), slice(2, -2), slice(3, -3))  # the edges extend the nearest value
    np.testing.assert_allclose(forward[inner], expected[inner], atol=1e-3)
    back = to_input_grid(expected, grid, order=1)
    np.testing.assert_allclose(back[3:-3, 3:-3, 2:-2], field[3:-3, 3:-3, 2:-2], atol=1e-3)
    np.testing.assert_allclose(
        resample_world(expected, grid.affine, affine, shape, order=1)[3:-3, 3:-3, 2:-2],
        field[3:-3, 3:-3, 2:-2],
        atol=1e-3,
    )


def test_permuted_axes_are_handled_in_world_coordinates():
    """A sagittal acquisition (voxel axes A, S, R) lands on the RAS model grid world-exactly."""
    sagittal = np.array([[0, 0, -1.5, 60.0], [1.0, 0, 0, -80], [0, 1.2, 0, -30], [0, 0, 0, 1.0]])
    shape = (50, 40, 30)
    grid = plan_grid(shape, sagittal, target_spacing=(2.0, 2.0, 2.0))
    assert nib.aff2axcodes(grid.affine) == ("R", "A", "S") and grid.reoriented_shape == (30, 50, 40)
    field = _world_linear(sagittal, shape)
    forward = to_model_grid(field, grid, order=1)
    np.testing.assert_allclose(
        forward[2:-2, 2:-2, 2:-2], _world_linear(grid.affine, grid.shape)[2:-2, 2:-2, 2:-2], atol=1e-3
    )
    back = to_input_grid(_world_linear(grid.affine, grid.shape), grid, order=1)
    np.testing.assert_allclose(back[3:-3, 3:-3, 3:-3], field[3:-3, 3:-3, 3:-3], atol=1e-3)


def test_reorientation_alone_is_lossless_and_flip_invariant():
    rng = np.random.default_rng(0)
    shape = (10, 12, 8)
    volume = rng.normal(size=shape).astype(np.float32)
    lps = plan_grid(shape, LPS, target_spacing=(1.0, 1.0, 1.0))
    # the same data stored RAS: flip x and y, move the origin to the other corner
    img = nib.as_closest_canonical(nib.Nifti1Image(volume, LPS))
    ras = plan_grid(img.shape, img.affine, target_spacing=(1.0, 1.0, 1.0))
    assert not lps.resampled and not lps.identity and ras.identity
    on_model = to_model_grid(volume, lps)
    assert np.array_equal(on_model, np.asarray(img.dataobj)) and np.array_equal(lps.affine, ras.affine)
    assert np.array_equal(to_input_grid(on_model, lps), volume)


def test_labels_go_nearest_and_stay_labels():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:15, 5:15, 5:15] = 2
    labels[8:12, 8:12, 8:12] = 3
    grid = plan_grid(labels.shape, _affine((1.0, 1.0, 1.0)), target_spacing=(2.0, 2.0, 2.0))
    down = to_model_grid(labels, grid, order=0)
    assert down.dtype == np.uint8 and set(np.unique(down)) == {0, 2, 3}
    up = to_input_grid(down, grid, order=0)
    assert up.shape == labels.shape and (up == labels).mean() > 0.9


@pytest.mark.parametrize("bad", ["RAX", "RRS", "RA", 3])
def test_bad_orientation_names_the_value(bad):
    with pytest.raises(ConfigError, match="axis codes"):
        check_orientation(bad)


def test_reoriented_spacing_and_median():
    sagittal = np.array([[0, 0, 1.5, 0], [1.0, 0, 0, 0], [0, 1.2, 0, 0], [0, 0, 0, 1.0]])  # axes: A, S, R
    assert reoriented_spacing(sagittal, "RAS") == (1.5, 1.0, 1.2)
    assert median_spacing([(1, 1, 1), (2, 2, 6), (1, 1, 5)]) == (1.0, 1.0, 5.0)
    assert median_spacing([]) is None


# --- PreprocessConfig, preprocess_case ----------------------------------------------------


@pytest.mark.parametrize("bad", [[2, 2], [2, 0, 2], [2, -1, 2], ["a", 2, 2], [2, 2, float("nan")]])
def test_target_spacing_is_validated(bad):
    with pytest.raises(ConfigError, match="target_spacing"):
        from_dict(PreprocessConfig, {"target_spacing": bad}, where="config.data.preprocess")


def test_target_spacing_and_orientation_are_part_of_the_cache_key():
    base = PreprocessConfig()
    assert PreprocessConfig(target_spacing=(2, 2, 2)).fingerprint() != base.fingerprint()
    assert (
        PreprocessConfig(target_spacing=(1, 1, 1)).fingerprint()
        != PreprocessConfig(target_spacing=(2, 2, 2)).fingerprint()
    )
    assert PreprocessConfig(orientation="lps").orientation == "LPS"
    assert PreprocessConfig(orientation="LPS").fingerprint() != base.fingerprint()


def _case(image, label, affine):
    zooms = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    return SimpleNamespace(
        case=SimpleNamespace(case_id="c"), image=image, label=label, affine=affine, header=None, spacing=zooms
    )


def test_preprocess_case_resamples_images_and_labels_to_the_target():
    image = np.zeros((4, 40, 40, 12), np.float32)
    image[:, 8:32, 8:32, 2:10] = np.arange(1, 5, dtype=np.float32)[:, None, None, None] * 100
    label = np.zeros((40, 40, 12), np.uint8)
    label[16:24, 16:24, 4:8] = 2
    affine = _affine((0.5, 0.5, 6.0))
    pre = preprocess_case(_case(image, label, affine), PreprocessConfig(target_spacing=(2, 2, 2)))
    assert pre.spacing == (2.0, 2.0, 2.0) and pre.original_shape == (10, 10, 36)
    assert pre.grid is not None and pre.grid.input_shape == (40, 40, 12)
    assert pre.fingerprint["spacing"] == [0.5, 0.5, 6.0]  # the input's, for drift
    assert pre.fingerprint["grid"] == {"spacing": [2.0, 2.0, 2.0], "orientation": "RAS"}
    assert pre.label is not None and set(np.unique(pre.label)) == {0, 2}
    # the background stays exactly 0 and the tumour keeps its volume (nearest neighbour)
    assert (uncrop(pre.image, pre.bbox, pre.original_shape)[:, 0] == 0).all()
    volume = float((pre.label == 2).sum()) * 8.0
    assert abs(volume - 8 * 8 * 4 * 0.25 * 6.0) / (8 * 8 * 4 * 0.25 * 6.0) < 0.35


def test_without_a_target_a_lone_case_keeps_its_spacing():
    image = np.ones((4, 10, 12, 8), np.float32)
    pre = preprocess_case(_case(image, None, _affine((1.5, 1.5, 3.0), np.eye(4))), PreprocessConfig())
    assert pre.grid is None and pre.spacing == (1.5, 1.5, 3.0) and pre.original_shape == (10, 12, 8)


# --- fingerprints -------------------------------------------------------------------------


def _fp(spacing, orientation="LPS", grid=(2.0, 2.0, 2.0)):
    return {
        "shape": [10, 10, 10],
        "spacing": list(spacing),
        "orientation": list(orientation),
        "intensity": {},
        "grid": {"spacing": list(grid), "orientation": "RAS"},
    }


def test_training_fingerprint_records_the_common_model_grid():
    fp = training_fingerprint([_fp((1, 1, 1)), _fp((0.5, 0.5, 6))])
    assert fp["grid"] == {"spacing": [2.0, 2.0, 2.0], "orientation": "RAS"}
    assert fp["spacing"]["median"] == [0.75, 0.75, 3.5]
    assert "grid" not in training_fingerprint([_fp((1, 1, 1)), _fp((1, 1, 1), grid=(1, 1, 1))])


def test_legacy_grid_only_for_one_spacing_and_one_orientation():
    assert legacy_grid(training_fingerprint([_fp((2, 2, 2)), _fp((2, 2, 2))])) == ((2.0, 2.0, 2.0), "LPS")
    assert legacy_grid(training_fingerprint([_fp((2, 2, 2)), _fp((1, 1, 1))])) is None
    assert legacy_grid(training_fingerprint([_fp((2, 2, 2)), _fp((2, 2, 2), "RAS")])) is None
    assert legacy_grid({}) is None


# --- the cohort's target spacing ------------------------------------------------------------


def test_prepare_cohort_resolves_the_median_spacing_and_caches_per_spacing(tmp_path):
    from bratstune.data.cache import CaseCache
    from bratstune.data.cohort import prepare_cohort
    from bratstune.data.layout import discover
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path / "mixed"
    options = {"challenge": "GLI", "anatomy": "procedural", "seed": 3, "workers": 1}
    generate_cohort(root, cases=2, shape=(32, 32, 32), **options)  # 7.5 x 7.5 x 4.85 mm
    generate_cohort(root, cases=1, shape=(24, 24, 24), start_index=2, **options)  # 10 x 10 x 6.45 mm
    prepared = prepare_cohort(root, PreprocessConfig(), cache_root=tmp_path / "cache")
    target = prepared.preprocess.target_spacing
    assert target == pytest.approx((7.5, 7.5, 4.85))
    for case in prepared.cases:
        assert case.spacing == pytest.approx(target) and case.config_fingerprint == prepared.preprocess.fingerprint()
    assert [c.grid is not None and c.grid.resampled for c in prepared.cases] == [False, False, True]
    assert prepared.cases[2].original_shape == (32, 32, 32)  # 24 voxels of 10 (6.45) mm = 32 of 7.5 (4.85) mm

    # an explicit spacing is kept, cached as its own entries, and found again without decoding
    coarse = prepare_cohort(root, PreprocessConfig(target_spacing=(10, 10, 10)), cache_root=tmp_path / "cache")
    assert coarse.preprocess.target_spacing == (10.0, 10.0, 10.0) and coarse.cases[0].original_shape == (24, 24, 16)
    cache = CaseCache(tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "entries").glob("*/*"))) == 6
    hit = cache.lookup(discover(root).cases[0], coarse.preprocess)
    assert hit is not None and hit.grid is not None and hit.grid.shape == (24, 24, 16)
