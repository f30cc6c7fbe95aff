"""Tiny configurations of every architecture, fast on one CPU thread."""

from __future__ import annotations

import pytest
import torch

# 32^3 inputs; small widths. SwinUNETR at 32^3 has a 1^3 bottleneck, so it uses batch norm
# (and batches of 2) — which also exercises frozen running statistics.
TINY: dict[str, dict] = {
    "unet": {"patch_size": 32, "filters": [8, 16, 32, 64]},
    "resunet": {"patch_size": 32, "filters": [8, 16, 32, 64], "num_res_units": 1},
    "attention_unet": {"patch_size": 32, "filters": [8, 16, 32, 64]},
    "unetr": {"patch_size": 32, "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
    "swin_unetr": {"patch_size": 32, "feature_size": 12, "norm": "batch"},
    "segresnet": {"patch_size": 32, "init_filters": 8, "blocks_down": [1, 1, 1, 1], "blocks_up": [1, 1, 1]},
    "transunet_enc": {
        "patch_size": 32,
        "filters": [8, 16, 32, 64],
        "hidden_size": 48,
        "mlp_dim": 96,
        "num_heads": 3,
        "num_layers": 2,
    },
    "transunet_dec": {
        "patch_size": 32,
        "filters": [8, 16, 32, 64],
        "hidden_size": 48,
        "mlp_dim": 96,
        "num_heads": 4,
        "num_queries": 6,
    },
}


@pytest.fixture
def tiny_model():
    """``tiny_model(arch, **overrides)`` -> a seeded tiny network with 4 inputs and 3 outputs."""
    from bratstune.models import build_model

    def make(arch: str, **overrides):
        torch.manual_seed(0)
        return build_model(arch, 4, 3, **{**TINY[arch], **overrides})

    return make
