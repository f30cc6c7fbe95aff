"""Loading MAE encoders into segmenters: the report, interpolation, sources, the train-config route."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bratstune.errors import ConfigError, DataError
from bratstune.models import build_model
from bratstune.models.encoder_init import (
    encoder_init_overrides,
    interpolate_pos_embed,
    load_encoder_weights,
    resolve_encoder_source,
)
from bratstune.pretrain.export import save_encoder

from .conftest import TINY_UNETR


@pytest.fixture
def exported(tiny_mae, tmp_path):
    model = tiny_mae()
    return model, save_encoder(model, tmp_path / "export")


def test_every_encoder_tensor_of_unetr_is_loaded(exported):
    mae, path = exported
    unetr = build_model("unetr", 4, 3, **TINY_UNETR)
    report = load_encoder_weights(unetr, path.parent)  # a folder works too
    assert report.complete
    assert sorted(report.loaded) == sorted(report.encoder_tensors)
    assert not (report.interpolated or report.mismatched or report.unexpected or report.missing)
    state = unetr.state_dict()
    for key, value in mae.vit.state_dict().items():
        assert torch.equal(state[f"vit.{key}"], value), key
    assert "161 tensors loaded" in report.summary()


def test_position_embeddings_of_another_grid_are_interpolated_and_reported(exported):
    _, path = exported  # MAE grid 2x2x2
    unetr = build_model("unetr", 4, 3, **{**TINY_UNETR, "patch_size": [48, 48, 32]})  # grid 3x3x2
    report = load_encoder_weights(unetr, path)
    assert report.complete
    assert report.interpolated == [("vit.patch_embedding.position_embeddings", (1, 8, 48), (1, 18, 48))]
    assert "interpolated vit.patch_embedding.position_embeddings: [1, 8, 48] -> [1, 18, 48]" in report.summary()


def test_interpolation_is_trilinear():
    pos = torch.randn(1, 8, 6)
    assert torch.allclose(interpolate_pos_embed(pos, (2, 2, 2), (2, 2, 2)), pos)
    # a field linear along x stays linear: corners at -1/+1 (half-pixel, align_corners=False)
    ramp = torch.tensor([-1.0, 1.0]).reshape(2, 1, 1, 1).expand(2, 2, 2, 1).reshape(1, 8, 1)
    out = interpolate_pos_embed(ramp, (2, 2, 2), (4, 2, 2)).reshape(4, 2, 2)
    assert out[:, 0, 0].tolist() == pytest.approx([-1.0, -0.5, 0.5, 1.0])


def test_shape_mismatches_are_reported_not_silently_dropped(tiny_mae, tmp_path):
    path = save_encoder(tiny_mae(hidden_size=96, mlp_dim=192, num_heads=4), tmp_path / "wide")
    unetr = build_model("unetr", 4, 3, **TINY_UNETR)  # hidden 48: nothing fits except ...
    with pytest.raises(DataError, match="no tensor matches"):
        load_encoder_weights(unetr, path)
    # a different MLP width: attention and norms load, the MLP is reported as mismatched
    path = save_encoder(tiny_mae(mlp_dim=192), tmp_path / "mlp")
    report = load_encoder_weights(unetr, path)
    assert not report.complete
    names = {name for name, _, _ in report.mismatched}
    assert "vit.blocks.0.mlp.linear1.weight" in names and len(names) == 12 * 3
    assert not report.missing and report.loaded
    with pytest.raises(DataError, match="require_complete"):
        load_encoder_weights(build_model("unetr", 4, 3, **TINY_UNETR), path, require_complete=True)


def test_monai_masked_autoencoder_state_dicts_are_mapped(tmp_path):
    from monai.networks.nets import MaskedAutoEncoderViT

    torch.manual_seed(0)
    monai_mae = MaskedAutoEncoderViT(
        in_channels=4,
        img_size=32,
        patch_size=16,
        hidden_size=48,
        mlp_dim=96,
        num_layers=12,
        num_heads=3,
        decoder_hidden_size=48,
        decoder_mlp_dim=96,
        decoder_num_layers=1,
        decoder_num_heads=3,
        pos_embed_type="learnable",
    )
    torch.save(monai_mae.state_dict(), tmp_path / "monai.pt")
    unetr = build_model("unetr", 4, 3, **TINY_UNETR)
    report = load_encoder_weights(unetr, tmp_path / "monai.pt")
    assert report.complete and not report.mismatched
    assert torch.equal(unetr.state_dict()["vit.norm.weight"], monai_mae.state_dict()["blocks.12.weight"])
    assert {"cls_token", "mask_tokens", "decoder_pred.weight"} <= set(report.unexpected)


def test_train_config_routes_encoder_from_and_freezes(exported):
    from bratstune.labels import get_scheme
    from bratstune.training.config import load_train_config
    from bratstune.training.network import prepare_network

    mae, path = exported
    config = load_train_config(
        {
            "model": {"name": "unetr", "kwargs": {k: v for k, v in TINY_UNETR.items() if k != "patch_size"}},
            "data": {"patch_size": [32, 32, 32]},
            "init": {"encoder_from": str(path), "require_complete": True},
            "freeze": ["encoder"],
        }
    )
    model = prepare_network(config, get_scheme("brats2023"))
    assert model.bratstune_init_report.complete
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("vit.") for n in frozen)


def test_sources_and_search_space_overrides(tmp_path):
    with pytest.raises(DataError, match="no such file, folder, MLflow run id"):
        resolve_encoder_source(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no encoder.pt here"):
        resolve_encoder_source(tmp_path / "empty")
    assert encoder_init_overrides("scratch", freeze_encoder=True) == {"init.encoder_from": None, "freeze": []}
    assert encoder_init_overrides("mae", freeze_encoder=True) == {
        "init.encoder_from": "models:/bratstune-mae-encoder@latest",
        "freeze": ["encoder"],
    }
    with pytest.raises(ConfigError, match="did you mean 'mae'"):
        encoder_init_overrides("mea")


def test_crops_are_deterministic_padded_and_differ_between_workers():
    from bratstune.pretrain.data import CropSampler, random_crop

    image = np.arange(4 * 20 * 40 * 12, dtype=np.float32).reshape(4, 20, 40, 12)
    crop = random_crop(image, (16, 32, 16), np.random.default_rng(0))
    assert crop.shape == (4, 16, 32, 16) and crop.dtype == np.float32
    assert (crop[:, :, :, :2] == 0).all() and (crop[:, :, :, -2:] == 0).all()  # 12 -> 16: 2 + 2 padded
    a = CropSampler([image], (16, 16, 16), seed=0, rank=0)
    b = CropSampler([image], (16, 16, 16), seed=0, rank=1)
    x0, _ = a.batch(epoch=1, step=0, batch_size=2)
    assert torch.equal(x0, a.batch(epoch=1, step=0, batch_size=2)[0])
    assert not torch.equal(x0, b.batch(epoch=1, step=0, batch_size=2)[0])
    assert not torch.equal(x0, a.batch(epoch=1, step=1, batch_size=2)[0])
