from __future__ import annotations

import pytest
import torch

from bratstune.errors import ConfigError
from bratstune.models import ARCHITECTURES, architecture_of, build_model, nnunet_topology

torch.set_num_threads(1)


def test_all_required_architectures_are_registered():
    assert set(ARCHITECTURES) >= {"unet", "resunet", "attention_unet", "unetr", "swin_unetr", "segresnet"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_eval_forward_shape_and_name(arch, tiny_model):
    model = tiny_model(arch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32, 32))
    assert out.shape == (2, 3, 32, 32, 32)
    assert model.bratstune_arch == arch
    assert architecture_of(model) == arch


def test_unet_deep_supervision_is_stacked_in_training_mode_only(tiny_model):
    model = tiny_model("unet", deep_supr_num=2)
    x = torch.randn(1, 4, 32, 32, 32)
    assert model.train()(x).shape == (1, 3, 3, 32, 32, 32)  # (B, 1 + deep_supr_num, C, ...)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 3, 32, 32, 32)
    plain = tiny_model("unet", deep_supervision=False).train()
    assert plain(x).shape == (1, 3, 32, 32, 32)


def test_architecture_of_bare_monai_network():
    from monai.networks.nets import SegResNet

    assert architecture_of(SegResNet(3, 8, 4, 3)) == "segresnet"


@pytest.mark.parametrize(
    ("patch", "spacing", "max_levels", "kernels", "strides"),
    [
        # 48 -> 24 -> 12 -> 6 (6 / 2 = 3 < 4 stops): 4 levels
        (48, 1.0, None, [(3, 3, 3)] * 4, [(1, 1, 1)] + [(2, 2, 2)] * 3),
        # 128 -> 4 halvings to 8 -> 5th stopped by max_levels=5
        (128, 1.0, 5, [(3, 3, 3)] * 5, [(1, 1, 1)] + [(2, 2, 2)] * 4),
        # thick slices (4x): z pooled only once x/y spacing caught up; kernel 1 along z at level 0;
        # 64x64x16 -> 32x32x16 -> 16x16x8 -> 8x8x4 -> 4x4x4 (z stops at the minimum size 4)
        (
            (64, 64, 16),
            (0.5, 0.5, 2.0),
            None,
            [(3, 3, 1)] + [(3, 3, 3)] * 4,
            [(1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1)],
        ),
    ],
)
def test_nnunet_topology(patch, spacing, max_levels, kernels, strides):
    assert nnunet_topology(patch, spacing, max_levels=max_levels) == (kernels, strides)


def test_unet_uses_at_most_len_filters_levels():
    model = build_model("unet", 4, 3, patch_size=128, filters=[8, 16, 32, 64])
    assert len(model.strides) == 4


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("unte", {}, "did you mean 'unet'"),
        ("swinunetr", {}, "did you mean 'swin_unetr'"),
        ("unet", {"filter": [8, 16, 32]}, "did you mean 'filters'"),
        ("unet", {"norm": "instnce"}, "did you mean 'instance'"),
        (
            "unet",
            {"patch_size": 32, "filters": [8, 16, 32, 64], "deep_supr_num": 3},
            "deep_supr_num must be between 1 and 2",
        ),
        ("unet", {"patch_size": 8}, "at least 3"),
        ("unet", {"patch_size": [48, 48, 0]}, "three positive integers"),
        ("swin_unetr", {"patch_size": 48}, "divisible by 32"),
        ("swin_unetr", {"patch_size": 32}, "1x1x1 bottleneck"),
        ("swin_unetr", {"feature_size": 16}, "multiple of 12"),
        ("unetr", {"patch_size": 40}, r"divisible by 16.*try patch_size \[48, 48, 48\]"),
        ("unetr", {"hidden_size": 100, "num_heads": 6}, "divisible by num_heads"),
        ("resunet", {"num_res_units": 0}, "num_res_units must be >= 1"),
        ("segresnet", {"init_filters": 12}, "divisible by 8"),
        ("segresnet", {"blocks_up": [1, 1]}, "blocks_up needs"),
    ],
)
def test_bad_options_raise_config_error(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(name, 4, 3, **kwargs)


def test_bad_channels():
    with pytest.raises(ConfigError, match="out_channels must be a positive integer"):
        build_model("unet", 4, 0)
