"""The MAE module, masking, loss, schedule and config (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bratstune.errors import ConfigError
from bratstune.pretrain.config import MaeModelConfig, load_pretrain_config
from bratstune.pretrain.model import (
    encoder_state_dict,
    mae_loss,
    normalise_patches,
    patchify,
    random_noise,
    unpatchify,
)
from bratstune.pretrain.worker import lr_lambda


def test_patchify_round_trip_and_token_order_match_the_patch_embedding(tiny_mae):
    x = torch.randn(2, 4, 32, 48, 16)
    patches = patchify(x, (16, 16, 16))
    assert patches.shape == (2, 2 * 3 * 1, 16**3 * 4)
    assert torch.equal(unpatchify(patches, (16, 16, 16), (2, 3, 1), 4), x)
    # token n of patchify is token n of the conv patch embedding (UNETR's order)
    model = tiny_mae()
    conv = model.vit.patch_embedding.patch_embeddings
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        tokens = conv(x).flatten(2).transpose(1, 2)  # (1, N, D)
        weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.weight.shape[0], -1)  # (D, px*py*pz*C)
        by_patch = patchify(x, (16, 16, 16)) @ weight.T + conv.bias
    torch.testing.assert_close(tokens, by_patch, rtol=1e-4, atol=1e-4)


def test_masking_hides_the_configured_fraction_and_follows_the_noise(tiny_mae):
    model = tiny_mae(mask_ratio=0.75)
    x = torch.randn(3, 4, 32, 32, 32)
    noise = random_noise(np.random.default_rng(0), 3, 8)
    pred, mask = model(x, noise)
    assert pred.shape == (3, 8, 16**3 * 4) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [6, 6, 6]  # 75 % of 8 tokens
    kept = torch.argsort(noise, dim=1)[:, :2]
    assert not mask.gather(1, kept).any()
    pred2, mask2 = model(x, noise)
    assert torch.equal(mask, mask2) and torch.allclose(pred, pred2)
    # the visible tokens' content is all the encoder sees: changing a masked patch changes nothing
    # in the encoder output (only visible tokens are gathered)
    keep = kept[:1]
    y = x[:1].clone()
    hidden = torch.nonzero(mask[0])[0].item()
    gx, gy, gz = np.unravel_index(hidden, (2, 2, 2))
    y[:, :, gx * 16 : (gx + 1) * 16, gy * 16 : (gy + 1) * 16, gz * 16 : (gz + 1) * 16] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(model.encode_visible(x[:1], keep), model.encode_visible(y, keep))


def test_bad_input_shape_is_rejected(tiny_mae):
    with pytest.raises(ValueError, match="crop or pad to model.img_size"):
        tiny_mae()(torch.zeros(1, 4, 48, 48, 48))


def test_loss_counts_only_masked_patches_with_per_patch_normalised_targets():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]]])  # B=1, N=3, P=2
    mask = torch.tensor([[True, False, True]])
    # normalised patches: (1,3) -> (-1/sqrt(2), 1/sqrt(2)) (unbiased var 2), (0,4) -> same
    t_hat, mean, std = normalise_patches(target)
    s = 1 / math.sqrt(2.0)
    torch.testing.assert_close(t_hat[0, 0], torch.tensor([-s, s]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean[0, :, 0], torch.tensor([2.0, 2.0, 2.0]))
    pred = torch.zeros(1, 3, 2)
    # each masked patch: mean((0 - t_hat)^2) = 0.5 (up to eps); the visible one is ignored
    assert mae_loss(pred, target, mask).item() == pytest.approx(0.5, rel=1e-5)
    pred_visible_changed = pred.clone()
    pred_visible_changed[0, 1] = 100.0
    assert mae_loss(pred_visible_changed, target, mask).item() == pytest.approx(0.5, rel=1e-5)
    # raw targets: masked patches (1,3) and (0,4): mean of squares = (5 + 8) / 2
    assert mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(6.5)
    with pytest.raises(ValueError, match="expected pred/target"):
        mae_loss(pred, target[:, :2], mask)


def test_encoder_keys_are_unetrs_vit_keys(tiny_mae):
    from bratstune.models import build_model

    from .conftest import TINY_UNETR

    encoder = encoder_state_dict(tiny_mae())
    unetr = build_model("unetr", 4, 3, **TINY_UNETR).state_dict()
    vit = {k: v.shape for k, v in unetr.items() if k.startswith("vit.")}
    assert {k: v.shape for k, v in encoder.items()} == vit
    assert "vit.norm.weight" in encoder and "vit.blocks.11.mlp.linear1.weight" in encoder


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(total_steps=10, warmup_steps=2, min_fraction=0.1)
    values = [f(s) for s in range(11)]
    assert values[0] == pytest.approx(1 / 3) and values[1] == pytest.approx(2 / 3)
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))
    assert values[10] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("mapping", "workers", "batch", "scale"),
    [
        ({}, 1, 2, 1.0),
        ({}, 4, 8, 4.0),
        ({"optim": {"lr_scaling": "sqrt"}}, 4, 8, 2.0),
        ({"optim": {"lr_scaling": "none"}}, 4, 8, 1.0),
        ({"optim": {"reference_batch_size": 8}, "data": {"batch_size": 4}}, 4, 16, 2.0),
    ],
)
def test_effective_batch_and_lr_scaling(mapping, workers, batch, scale):
    config = load_pretrain_config(mapping)
    assert config.effective_batch_size(workers) == batch
    assert config.lr_scale(workers) == pytest.approx(scale)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"model": {"img_size": 40}}, "must be divisible by model.patch_size"),
        ({"model": {"mask_ratio": 1.0}}, "mask_ratio"),
        ({"model": {"decoder_hidden_size": 64, "decoder_num_heads": 4}}, "divisible by 6"),
        ({"optim": {"lr_scaling": "linaer"}}, "did you mean 'linear'"),
        ({"epoch": 3}, "did you mean 'epochs'"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(mapping, message):
    with pytest.raises(ConfigError, match=message):
        load_pretrain_config(mapping)


def test_grid_and_visible_tokens():
    cfg = MaeModelConfig(img_size=(48, 48, 32), patch_size=16, mask_ratio=0.75)
    assert cfg.grid == (3, 3, 2) and cfg.num_tokens == 18 and cfg.visible_tokens == 4
