"""Tiny MAE / UNETR sizes shared by the pre-training tests (UNETR always has 12 ViT layers)."""

from __future__ import annotations

import pytest

#: MAE whose encoder equals the tiny UNETR's ViT (32^3 crops, 16^3 patches: a 2x2x2 grid)
TINY_MAE = {
    "img_size": [32, 32, 32],
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_heads": 3,
    "decoder_hidden_size": 48,
    "decoder_mlp_dim": 96,
    "decoder_num_heads": 3,
    "decoder_num_layers": 1,
}
#: ``build_model("unetr", 4, 3, **TINY_UNETR)``
TINY_UNETR = {"patch_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 3}


@pytest.fixture
def tiny_mae():
    """``tiny_mae(**model_overrides)`` -> a seeded MaskedAutoencoder3D."""
    import torch

    from bratstune.pretrain.config import MaeModelConfig
    from bratstune.pretrain.model import MaskedAutoencoder3D

    def make(**overrides):
        torch.manual_seed(0)
        return MaskedAutoencoder3D(MaeModelConfig(**{**TINY_MAE, **overrides}))

    return make
