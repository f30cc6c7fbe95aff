from __future__ import annotations

import pytest
import torch
from torch import nn

from bratstune.errors import ConfigError
from bratstune.models import ARCHITECTURES, GROUPS, layer_groups, parameter_groups

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_groups_partition_all_parameters(arch, tiny_model):
    model = tiny_model(arch)
    groups = layer_groups(model)
    assert list(groups) == list(GROUPS)
    assert all(groups[g] for g in GROUPS), groups  # no empty group
    names = parameter_groups(model)  # raises on a parameter in zero or two groups
    flat = [n for g in GROUPS for n in names[g]]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    assert all(names[g] for g in GROUPS)  # every group owns parameters


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_groups_partition_parameters_of_default_sized_models(arch):
    from bratstune.models import build_model

    kw = {"patch_size": 64} if arch == "swin_unetr" else {}
    model = build_model(arch, 4, 3, **kw)
    parameter_groups(model)


def test_resunet_groups_without_residual_units_still_partition():
    from monai.networks.nets import UNet

    parameter_groups(UNet(3, 4, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=0))


def test_transformer_encoder_is_exactly_the_transformer(tiny_model):
    assert layer_groups(tiny_model("unetr"))["encoder"] == ["vit"]
    assert layer_groups(tiny_model("swin_unetr"))["encoder"] == ["swinViT"]


def test_wrapped_model_prefixes(tiny_model):
    wrapped = nn.DataParallel(tiny_model("segresnet"))
    assert layer_groups(wrapped)["head"] == ["module.conv_final"]
    parameter_groups(wrapped)


def test_unknown_model_type():
    with pytest.raises(ConfigError, match="no layer groups known for Linear"):
        layer_groups(nn.Linear(2, 2))
