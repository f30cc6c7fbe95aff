"""Tests of bratstune.data.preprocess: crop, z-score, percentile rescale, histogram matching."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bratstune.config_utils import from_dict
from bratstune.data.preprocess import (
    HistogramReference,
    PreprocessConfig,
    brain_bbox,
    load_reference,
    match_histogram,
    preprocess_arrays,
    preprocess_case,
    uncrop,
)
from bratstune.errors import ConfigError, DataError


def _phantom(shape=(20, 22, 18), seed=0):
    """(4, X, Y, Z) image: a box of 'brain' with per-modality intensity offsets, zero outside."""
    rng = np.random.default_rng(seed)
    image = np.zeros((4, *shape), dtype=np.float32)
    box = (slice(3, 15), slice(5, 19), slice(2, 12))
    for c in range(4):
        image[(c, *box)] = rng.gamma(2.0 + c, 50.0 * (c + 1), size=(12, 14, 10)) + 1.0
    label = np.zeros(shape, dtype=np.uint8)
    label[6:9, 8:12, 4:7] = 2
    label[7:8, 9:11, 5:6] = 3
    return image, label, box


def _case_data(image, label, affine=None):
    case = SimpleNamespace(case_id="BraTS-GLI-00000-000")
    return SimpleNamespace(
        case=case,
        image=image,
        label=label,
        affine=np.eye(4) if affine is None else affine,
        header=None,
        spacing=(1.0, 1.0, 1.0),
    )


def test_zscore_over_brain_only_background_zero():
    image, label, box = _phantom()
    out, out_label, bbox = preprocess_arrays(image, label, PreprocessConfig())
    assert bbox == box
    assert out.dtype == np.float32 and out.shape == (4, 12, 14, 10)
    assert out_label.dtype == np.uint8 and out_label.shape == (12, 14, 10)
    for c in range(4):
        brain = out[c]  # the whole cropped box is brain here
        assert abs(float(brain.mean())) < 1e-5
        assert abs(float(brain.std()) - 1.0) < 1e-4
    # hand check one voxel: (x - mean) / std over the brain voxels of that modality
    raw = image[(0, *box)].astype(np.float64)
    expected = (raw[0, 0, 0] - raw.mean()) / raw.std()
    assert out[0, 0, 0, 0] == pytest.approx(expected, rel=1e-5)


def test_zscore_background_stays_zero_without_crop():
    image, label, box = _phantom()
    out, _, bbox = preprocess_arrays(image, label, PreprocessConfig(crop_to_brain=False))
    assert out.shape == image.shape
    assert bbox == tuple(slice(0, s) for s in image.shape[1:])
    background = np.ones(image.shape[1:], bool)
    background[box] = False
    assert np.all(out[:, background] == 0)
    assert abs(float(out[(0, *box)].mean())) < 1e-5


def test_margin_is_clipped_to_volume():
    image, label, _ = _phantom()
    _, _, bbox = preprocess_arrays(image, label, PreprocessConfig(margin=4))
    assert bbox == (slice(0, 19), slice(1, 22), slice(0, 16))


def test_brain_bbox_of_empty_mask_is_whole_volume():
    assert brain_bbox(np.zeros((3, 4, 5), bool)) == (slice(0, 3), slice(0, 4), slice(0, 5))


@pytest.mark.parametrize("channels", [None, 3])
def test_crop_uncrop_round_trip(channels):
    image, label, _ = _phantom()
    data = _case_data(image, label)
    pre = preprocess_case(data, PreprocessConfig(normalize="none", margin=1))
    assert pre.original_shape == image.shape[1:]
    np.testing.assert_array_equal(uncrop(pre.label, pre.bbox, pre.original_shape), label)
    np.testing.assert_array_equal(uncrop(pre.image, pre.bbox, pre.original_shape), image)
    if channels:
        probs = np.random.default_rng(1).random((channels, *pre.shape)).astype(np.float32)
        back = uncrop(probs, pre.bbox, pre.original_shape)
        assert back.shape == (channels, *image.shape[1:]) and back.dtype == np.float32
        np.testing.assert_array_equal(back[(slice(None), *pre.bbox)], probs)
        assert back.sum() == pytest.approx(probs.sum(), rel=1e-6)


def test_uncrop_rejects_wrong_shape():
    with pytest.raises(ValueError, match="does not fit"):
        uncrop(np.zeros((2, 2, 2)), (slice(0, 3), slice(0, 2), slice(0, 2)), (5, 5, 5))


def test_crop_affine_shifts_origin():
    image, label, box = _phantom()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, -30]
    pre = preprocess_case(_case_data(image, label, affine), PreprocessConfig())
    expected = affine @ np.array([box[0].start, box[1].start, box[2].start, 1.0])
    np.testing.assert_allclose(pre.crop_affine()[:, 3], expected)


def test_fingerprint_records_raw_percentiles_and_geometry():
    image, label, box = _phantom()
    pre = preprocess_case(_case_data(image, label), PreprocessConfig())
    fp = pre.fingerprint
    assert fp["shape"] == list(image.shape[1:]) and fp["spacing"] == [1.0, 1.0, 1.0]
    assert fp["orientation"] == ["R", "A", "S"]
    assert set(fp["intensity"]) == {"t1n", "t1c", "t2w", "t2f"}
    assert fp["intensity"]["t1c"]["p50"] == pytest.approx(float(np.median(image[(1, *box)])), rel=1e-6)
    assert fp["brain_voxels"] == 12 * 14 * 10


def test_percentile_rescale_to_unit_range():
    image, label, box = _phantom()
    out, _, _ = preprocess_arrays(image, label, PreprocessConfig(normalize="none", percentile_rescale=(2, 98)))
    raw = image[(0, *box)].astype(np.float64)
    lo, hi = np.percentile(raw, [2, 98])
    assert out[0].min() == pytest.approx(0.0) and out[0].max() == pytest.approx(1.0)
    # about 2 % of voxels sit on each clip boundary
    assert 0.01 < np.mean(out[0] == 0.0) < 0.04
    v = raw[0, 0, 0]
    assert out[0, 0, 0, 0] == pytest.approx(np.clip((v - lo) / (hi - lo), 0, 1), rel=1e-5, abs=1e-7)


def test_percentile_rescale_then_zscore():
    image, label, _ = _phantom()
    out, _, _ = preprocess_arrays(image, label, PreprocessConfig(percentile_rescale=(1, 99)))
    assert abs(float(out[2].mean())) < 1e-5 and abs(float(out[2].std()) - 1) < 1e-4


def test_histogram_matching_moves_histogram_onto_reference():
    rng = np.random.default_rng(0)
    source = rng.exponential(3.0, size=20000) + 5.0
    target = rng.normal(100.0, 10.0, size=20000)
    levels = np.linspace(0, 100, 101)
    matched = match_histogram(source, levels, np.percentile(target, levels))
    for q in (5, 25, 50, 75, 95):
        assert np.percentile(matched, q) == pytest.approx(np.percentile(target, q), abs=0.5)
    # monotone: the order of voxels is kept
    order = np.argsort(source)
    assert np.all(np.diff(matched[order]) >= -1e-9)


def test_histogram_reference_from_npy_and_json(tmp_path):
    image, label, box = _phantom()
    ref_image, _, _ = preprocess_arrays(_phantom(seed=5)[0] * 3.0 + 7.0, None, PreprocessConfig(normalize="none"))
    np.save(tmp_path / "ref.npy", ref_image)
    config = PreprocessConfig(normalize="none", histogram_match=str(tmp_path / "ref.npy"))
    pre = preprocess_case(_case_data(image, label), config)
    for c in range(4):
        brain = pre.image[c][pre.image[c] != 0]
        assert np.median(brain) == pytest.approx(np.median(ref_image[c]), rel=0.02)
    reference = load_reference(tmp_path / "ref.npy")
    reference.save(tmp_path / "ref.json")
    again = load_reference(tmp_path / "ref.json")
    assert again.digest() == reference.digest()
    np.testing.assert_allclose(again.values, reference.values)


def test_histogram_reference_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_reference(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a histogram reference"):
        load_reference(tmp_path / "bad.json")
    image, label, _ = _phantom()
    with pytest.raises(ConfigError, match="cohort"):
        preprocess_case(_case_data(image, label), PreprocessConfig(histogram_match="cohort"))


def test_cohort_reference_from_images():
    images = [preprocess_arrays(_phantom(seed=s)[0], None, PreprocessConfig())[0] for s in range(3)]
    ref = HistogramReference.from_images(images)
    assert ref.values.shape == (4, 101)
    out, _, _ = preprocess_arrays(_phantom(seed=9)[0], None, PreprocessConfig(histogram_match=True), reference=ref)
    np.testing.assert_allclose(np.percentile(out[1], [0, 50, 100]), ref.values[1, [0, 50, 100]], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"normalize": "minmax"}, "unknown normalize"),
        ({"margin": -1}, "margin"),
        ({"percentile_rescale": (98, 2)}, "percentile_rescale"),
        ({"percentile_rescale": (0, 101)}, "percentile_rescale"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PreprocessConfig(**kwargs)


def test_config_fingerprint_is_stable_and_sensitive():
    a = PreprocessConfig()
    assert a.fingerprint() == PreprocessConfig().fingerprint()
    assert len(a.fingerprint()) == 16
    assert a.fingerprint() != PreprocessConfig(margin=2).fingerprint()
    assert a.fingerprint() != PreprocessConfig(percentile_rescale=(2, 98)).fingerprint()
    # YAML round trip through from_dict, including the boolean spelling of histogram_match
    yaml_like = from_dict(PreprocessConfig, {"margin": 2, "percentile_rescale": [2, 98], "histogram_match": True})
    assert yaml_like.percentile_rescale == (2.0, 98.0) and yaml_like.histogram_match == "cohort"
    assert from_dict(PreprocessConfig, {"histogram_match": "ref.json"}).histogram_match == "ref.json"
    assert from_dict(PreprocessConfig, {"histogram_match": False}).histogram_match is None
