"""Tests of bratstune.data.augment: shapes, label values, config validation, PatchDataset use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from bratstune.config_utils import load_yaml
from bratstune.data.augment import AugmentConfig, RandomIntensityScale, augment_config, build_augment
from bratstune.data.preprocess import PreprocessedCase
from bratstune.data.sampling import PatchDataset
from bratstune.errors import ConfigError

ALWAYS = AugmentConfig(
    flip_prob=1.0,
    affine_prob=1.0,
    elastic_prob=1.0,
    noise_prob=1.0,
    intensity_scale_prob=1.0,
    gamma_prob=1.0,
    elastic_max_displacement=2.0,
)


def _sample(size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(1, size, size, size, dtype=torch.uint8)
    label[0, 6:18, 6:18, 6:18] = 2
    label[0, 9:15, 9:15, 9:15] = 1
    label[0, 11:13, 11:13, 11:13] = 3
    return {"image": torch.randn(4, size, size, size, generator=g), "label": label}


def test_default_config_builds_compose():
    transform = build_augment(AugmentConfig())
    assert isinstance(transform, tio.Compose)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == [
        "RandomFlip",
        "RandomAffine",
        "RandomElasticDeformation",
        "RandomIntensityScale",
        "RandomGamma",
        "RandomNoise",
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_every_transform_preserves_shapes_and_label_values(seed):
    torch.manual_seed(seed)
    sample = _sample(seed=seed)
    out = build_augment(ALWAYS)(sample)
    assert out["image"].shape == (4, 24, 24, 24)
    assert out["label"].shape == (1, 24, 24, 24)
    values = set(torch.unique(out["label"]).tolist())
    assert values <= {0, 1, 2, 3} and {2} <= values  # nearest interpolation: no blended labels
    assert np.allclose(out["label"].numpy(), np.round(out["label"].numpy()))
    assert torch.isfinite(out["image"]).all()
    assert not torch.equal(out["image"], sample["image"])


def test_disabled_is_identity():
    sample = _sample()
    out = build_augment(AugmentConfig(enabled=False))(sample)
    assert torch.equal(out["image"], sample["image"]) and torch.equal(out["label"], sample["label"])


def test_flip_moves_image_and_label_together():
    cfg = AugmentConfig(
        flip_prob=1.0, flip_axes=(0,), affine_prob=0, elastic_prob=0, noise_prob=0, intensity_scale_prob=0, gamma_prob=0
    )
    sample = _sample()
    sample["label"][0, 0, 0, 0] = 1  # an asymmetric marker
    transform = build_augment(cfg)
    for seed in range(8):
        torch.manual_seed(seed)
        out = transform(sample)
        flipped = bool(out["label"][0, -1, 0, 0] == 1)
        expected = torch.flip(sample["image"], dims=[1]) if flipped else sample["image"]
        assert torch.equal(out["image"], expected)


def test_intensity_transforms_leave_label_alone():
    cfg = AugmentConfig(flip_prob=0, affine_prob=0, elastic_prob=0, noise_prob=1, intensity_scale_prob=1, gamma_prob=1)
    sample = _sample()
    out = build_augment(cfg)(sample)
    assert torch.equal(out["label"].to(torch.uint8), sample["label"])


def test_random_intensity_scale_per_channel():
    torch.manual_seed(0)
    image = torch.ones(3, 4, 4, 4)
    out = RandomIntensityScale((0.5, 2.0), include=["image"])({"image": image})["image"]
    factors = out[:, 0, 0, 0]
    assert torch.all((factors >= 0.5) & (factors <= 2.0)) and len(set(factors.tolist())) == 3


def test_config_from_yaml(tmp_path):
    (tmp_path / "aug.yaml").write_text("flip_prob: 0.3\nscale_range: [0.9, 1.2]\nelastic_prob: 0\n")
    cfg = augment_config(load_yaml(tmp_path / "aug.yaml"))
    assert cfg.flip_prob == 0.3 and cfg.scale_range == (0.9, 1.2) and cfg.elastic_prob == 0.0
    assert "RandomElasticDeformation" not in [type(t).__name__ for t in build_augment(cfg).transforms]
    with pytest.raises(ConfigError, match="did you mean 'flip_prob'"):
        augment_config({"flip_probability": 0.5})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"scale_range": (1.2, 0.8)}, "scale_range"),
        ({"flip_axes": (0, 3)}, "flip_axes"),
        ({"elastic_control_points": 3}, "elastic_control_points"),
        ({"intensity_scale_range": (0.0, 1.0)}, "positive"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AugmentConfig(**kwargs)


def test_patch_dataset_with_augment_keeps_dtypes_and_is_reproducible():
    shape = (30, 30, 30)
    label = np.zeros(shape, np.uint8)
    label[10:20, 10:20, 10:20] = 2
    label[13:17, 13:17, 13:17] = 3
    case = PreprocessedCase(
        case_id="c",
        image=np.random.default_rng(0).normal(size=(4, *shape)).astype(np.float32),
        label=label,
        bbox=tuple(slice(0, s) for s in shape),
        original_shape=shape,
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
    )
    cfg = AugmentConfig(affine_prob=1.0, elastic_prob=0.0)
    ds = PatchDataset([case], patch_size=16, samples_per_epoch=4, transform=build_augment(cfg), seed=1)
    a, b = ds[2], ds[2]
    assert a["image"].dtype == torch.float32 and a["label"].dtype == torch.uint8
    assert a["image"].shape == (4, 16, 16, 16) and a["label"].shape == (1, 16, 16, 16)
    assert set(torch.unique(a["label"]).tolist()) <= {0, 2, 3}
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
