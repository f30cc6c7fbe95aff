from __future__ import annotations

import pytest
import torch
import yaml

from bratstune.errors import ConfigError
from bratstune.presets import describe_preset, list_presets, load_preset, preset_text

torch.set_num_threads(1)

ARCH_PRESETS = [
    "unet",
    "resunet",
    "attention_unet",
    "unetr",
    "swin_unetr",
    "segresnet",
    "transunet_enc",
    "transunet_dec",
]
PUBLISHED = ["focal_tversky_ce", "dice_focal_edge", "mse_ce_edge"]
GPU_SIZED = ["transunet_enc_gpu", "transunet_dec_gpu"]  # the paper's sizes; built here, trained on a GPU


def test_list_presets():
    assert set(list_presets()) == set(ARCH_PRESETS + PUBLISHED + GPU_SIZED)
    assert list_presets() == sorted(list_presets())


@pytest.mark.parametrize("name", ARCH_PRESETS + PUBLISHED + GPU_SIZED)
def test_preset_is_a_valid_train_config_and_builds(name):
    from bratstune.models import build_model
    from bratstune.training.config import load_train_config
    from bratstune.training.losses import CompoundLoss

    config = load_train_config(load_preset(name))
    assert describe_preset(name)
    build_model(config.model.name, 4, 3, patch_size=config.data.patch_size, **config.model.kwargs)
    CompoundLoss(
        config.loss.weights,
        mode=config.loss.mode,
        alpha=config.loss.alpha,
        beta=config.loss.beta,
        gamma=config.loss.gamma,
    )


@pytest.mark.parametrize("name", ARCH_PRESETS)
def test_architecture_presets_use_their_architecture(name):
    assert load_preset(name)["model"]["name"] == name


@pytest.mark.parametrize(
    ("name", "loss", "optim"),
    [
        (
            "focal_tversky_ce",
            {"weights": {"focal_tversky": 1.0, "ce": 1.0}, "alpha": 0.3, "beta": 0.7, "gamma": 2.0},
            {"name": "adam", "lr": 1e-4, "schedule": "cosine", "warmup_fraction": 0.02},
        ),
        (
            "dice_focal_edge",
            {"weights": {"dice": 1.0, "focal": 1.0, "edge": 0.05}},
            {"name": "adam", "lr": 6e-5, "schedule": "exponential"},
        ),
        ("mse_ce_edge", {"weights": {"mse": 0.25, "ce": 0.0044, "edge": 0.00015}}, {}),
    ],
)
def test_published_settings(name, loss, optim):
    preset = load_preset(name)
    assert loss.items() <= preset["loss"].items()
    assert optim.items() <= preset["optim"].items()


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="unknown preset 'unetx' \\(did you mean 'unet'\\?\\)"):
        load_preset("unetx")


def test_cli_lists_and_shows(capsys):
    from bratstune.cli import main

    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ARCH_PRESETS + PUBLISHED)
    assert main(["presets", "--show", "focal_tversky_ce"]) == 0
    shown = capsys.readouterr().out
    assert shown == preset_text("focal_tversky_ce")
    assert yaml.safe_load(shown) == load_preset("focal_tversky_ce")
    assert main(["presets", "--show", "nope"]) == 2
