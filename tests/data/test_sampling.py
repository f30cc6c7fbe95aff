"""Tests of bratstune.data.sampling: stratified folds, tumour patches, validation volumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bratstune.data.preprocess import PreprocessedCase
from bratstune.data.sampling import (
    PatchDataset,
    ValidationDataset,
    extract_patch,
    stratified_folds,
    tumour_volume,
)
from bratstune.errors import ConfigError


def _case(shape=(40, 40, 40), tumour=((20, 22), (20, 22), (20, 22)), case_id="c0", seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(4, *shape)).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    if tumour is not None:
        label[tuple(slice(a, b) for a, b in tumour)] = 2
    return PreprocessedCase(
        case_id=case_id,
        image=image,
        label=label,
        bbox=tuple(slice(0, s) for s in shape),
        original_shape=shape,
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
    )


def test_tumour_volume():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2, :2, :1] = 3
    assert tumour_volume(label) == 4.0
    assert tumour_volume(label, (2.0, 1.0, 0.5)) == 4.0
    assert tumour_volume(None) == 0.0


# --- folds ----------------------------------------------------------------------------------
def test_folds_disjoint_complete_and_balanced():
    volumes = np.random.default_rng(0).lognormal(8, 1.5, size=23)
    folds = stratified_folds(volumes, k=5, seed=1)
    assert len(folds) == 5
    vals = np.concatenate([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(23))
    for train, val in folds:
        assert not set(train) & set(val)
        assert len(train) + len(val) == 23
    sizes = [len(v) for _, v in folds]
    assert max(sizes) - min(sizes) <= 1


def test_folds_deterministic_and_seed_dependent():
    volumes = np.random.default_rng(3).lognormal(8, 1, size=30)
    a = stratified_folds(volumes, 5, seed=7)
    b = stratified_folds(list(volumes), 5, seed=7)
    c = stratified_folds(volumes, 5, seed=8)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_folds_cover_small_and_large_tumours():
    volumes = np.arange(1, 51, dtype=float) ** 3  # 50 cases, volumes from tiny to huge
    q_lo, q_hi = np.quantile(volumes, [0.2, 0.8])
    for _, val in stratified_folds(volumes, k=5, seed=0):
        v = volumes[val]
        assert (v <= q_lo).sum() == 2 and (v >= q_hi).sum() >= 2  # each fold: 2 of the 10 smallest, 2 of the largest
        # the fold's median is close to the cohort's
        assert abs(np.median(v) - np.median(volumes)) < 0.35 * np.median(volumes)


@pytest.mark.parametrize("k", [1, 0, 6])
def test_folds_reject_bad_k(k):
    with pytest.raises(ConfigError, match="2 <= k <= 5"):
        stratified_folds([1, 2, 3, 4, 5], k=k)


def test_folds_reject_nan():
    with pytest.raises(ValueError, match="finite"):
        stratified_folds([1.0, float("nan"), 3.0], k=2)


def test_folds_k_equals_n_is_leave_one_out():
    folds = stratified_folds([5, 1, 3], k=3)
    assert sorted(len(v) for _, v in folds) == [1, 1, 1]


# --- patches --------------------------------------------------------------------------------
def test_extract_patch_pads_outside():
    a = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3)
    p = extract_patch(a, (-1, -1, -1), (5, 5, 5))
    assert p.shape == (1, 5, 5, 5)
    np.testing.assert_array_equal(p[0, 1:4, 1:4, 1:4], a[0])
    assert p.sum() == a.sum()


def test_patch_shapes_and_dtypes():
    ds = PatchDataset([_case()], patch_size=16, samples_per_epoch=4, seed=0)
    item = ds[0]
    assert item["image"].shape == (4, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 16, 16, 16) and item["label"].dtype == torch.uint8
    assert len(ds) == 4
    with pytest.raises(IndexError):
        ds[4]


def test_anisotropic_patch_and_small_volume_padding():
    small = _case(shape=(10, 30, 6), tumour=((4, 6), (10, 12), (2, 3)))
    ds = PatchDataset([small], patch_size=(16, 16, 8), samples_per_epoch=20, seed=0)
    for i in range(20):
        item = ds[i]
        assert item["image"].shape == (4, 16, 16, 8)
        # the whole 10 x . x 6 extent fits: the padded patch holds every tumour voxel when fg-centred
        if item["fg"]:
            assert int((item["label"] > 0).sum()) == 4


@pytest.mark.parametrize("fg_prob", [0.0, 0.3, 0.7, 1.0])
def test_foreground_fraction_matches_fg_prob(fg_prob):
    # one tumour voxel in a 64^3 volume: a uniform 8^3 patch almost never contains it
    case = _case(shape=(64, 64, 64), tumour=((40, 41), (10, 11), (50, 51)))
    ds = PatchDataset([case], patch_size=8, samples_per_epoch=600, fg_prob=fg_prob, seed=3)
    hits = np.array([bool(ds[i]["label"].any()) for i in range(len(ds))])
    flags = np.array([ds[i]["fg"] for i in range(len(ds))])
    assert np.all(hits[flags])  # a tumour-centred patch always contains the tumour
    assert abs(hits.mean() - fg_prob) < 0.06


def test_case_without_tumour_falls_back_to_uniform():
    ds = PatchDataset([_case(tumour=None)], patch_size=8, samples_per_epoch=10, fg_prob=1.0)
    assert not any(ds[i]["fg"] for i in range(10))


def test_deterministic_per_seed_epoch_and_index():
    cases = [_case(seed=0), _case(seed=1, tumour=((5, 9), (5, 9), (5, 9)))]
    a = PatchDataset(cases, patch_size=12, samples_per_epoch=8, seed=4)
    b = PatchDataset(cases, patch_size=12, samples_per_epoch=8, seed=4)
    for i in (0, 5, 7):
        assert torch.equal(a[i]["image"], b[i]["image"])
    a.set_epoch(1)
    assert not all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))
    b.set_epoch(1)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(8))


def test_dataloader_with_workers_matches_single_process():
    cases = [_case(seed=0), _case(seed=1)]
    ds = PatchDataset(cases, patch_size=12, samples_per_epoch=6, seed=2)
    single = [ds[i]["image"] for i in range(6)]
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert batches[0]["image"].shape == (2, 4, 12, 12, 12)
    assert batches[0]["label"].dtype == torch.uint8
    torch.testing.assert_close(torch.cat([b["image"] for b in batches]), torch.stack(single))


def test_transform_is_applied_and_seeded():
    def transform(sample):
        sample["image"] = sample["image"] + torch.rand(1)
        return sample

    ds = PatchDataset([_case()], patch_size=8, samples_per_epoch=3, transform=transform, seed=0)
    plain = PatchDataset([_case()], patch_size=8, samples_per_epoch=3, seed=0)
    state = torch.get_rng_state()
    first, again = ds[1]["image"], ds[1]["image"]
    assert torch.equal(first, again) and not torch.equal(first, plain[1]["image"])
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fg_prob": 1.5}, "fg_prob"),
        ({"samples_per_epoch": 0}, "samples_per_epoch"),
        ({"patch_size": (8, 8)}, "patch_size"),
    ],
)
def test_patch_dataset_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PatchDataset([_case()], **{"patch_size": 8, **kwargs})


def test_validation_dataset_returns_whole_volumes():
    cases = [_case(shape=(10, 12, 8), case_id="a"), _case(shape=(9, 9, 9), case_id="b", tumour=None)]
    ds = ValidationDataset(cases)
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (4, 10, 12, 8) and item["label"].shape == (1, 10, 12, 8)
    assert item["case_id"] == "a"
    np.testing.assert_array_equal(item["label"][0].numpy(), cases[0].label)
