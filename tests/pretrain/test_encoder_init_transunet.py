"""MAE encoder -> ``transunet_enc``: the ViT blocks load into ``transformer.vit``, the patch embedding is skipped."""

from __future__ import annotations

import pytest
import torch

from bratstune.models import build_model, freeze, parameter_groups
from bratstune.models.encoder_init import load_encoder_weights, map_mae_to_transunet
from bratstune.pretrain.export import save_encoder

#: a transunet_enc whose ViT matches the tiny MAE (d 48, 3 heads, MLP 96) with 2 layers
TINY_TRANSUNET = {
    "patch_size": [32, 32, 32],
    "filters": [8, 16, 32, 64],
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_heads": 3,
    "num_layers": 2,
}


@pytest.fixture
def exported(tiny_mae, tmp_path):
    model = tiny_mae(num_layers=2)
    return model, save_encoder(model, tmp_path / "export")


def test_mae_blocks_load_and_the_patch_embedding_is_skipped(exported):
    mae, path = exported
    torch.manual_seed(1)
    model = build_model("transunet_enc", 4, 3, **TINY_TRANSUNET)
    embedding_before = model.transformer.vit.patch_embedding.patch_embeddings.weight.clone()
    report = load_encoder_weights(model, path)

    # every ViT block and the final norm: 2 blocks x 11 tensors (norm1 2, qkv 1, out_proj 2, norm2 2, mlp 4) + norm 2
    assert report.complete and len(report.loaded) == 2 * 11 + 2
    assert sorted(report.loaded) == sorted(report.encoder_tensors)
    assert all(
        name.startswith("transformer.vit.blocks.") or name.startswith("transformer.vit.norm.") for name in report.loaded
    )
    assert not (report.interpolated or report.mismatched or report.unexpected or report.missing)
    assert sorted(report.skipped) == sorted(
        [
            "vit.patch_embedding.patch_embeddings.weight",
            "vit.patch_embedding.patch_embeddings.bias",
            "vit.patch_embedding.position_embeddings",
            "vit.blocks.0.norm_cross_attn.weight",
            "vit.blocks.0.norm_cross_attn.bias",
            "vit.blocks.1.norm_cross_attn.weight",
            "vit.blocks.1.norm_cross_attn.bias",
        ]
    )
    assert "skipped (not transferable): 7 tensors" in report.summary()
    assert report.to_dict()["skipped"] == report.skipped

    state = model.state_dict()
    for key, value in mae.vit.state_dict().items():
        if key.startswith("blocks.") and ".norm_cross_attn." not in key or key.startswith("norm."):
            assert torch.equal(state[f"transformer.vit.{key}"], value), key
    # the TransUNet's own patch embedding (1x1x1 convolution of CNN features) keeps its initialisation
    assert torch.equal(model.transformer.vit.patch_embedding.patch_embeddings.weight, embedding_before)

    # the loaded tensors are the transformer (group ``middle``): freezing it keeps exactly them fixed
    frozen = freeze(model, ["middle"])
    assert set(report.loaded) <= set(frozen) == set(parameter_groups(model)["middle"])


def test_a_deeper_mae_reports_its_extra_blocks_and_a_wider_one_its_mismatches(tiny_mae, tmp_path):
    deeper = save_encoder(tiny_mae(num_layers=3), tmp_path / "deeper")
    report = load_encoder_weights(build_model("transunet_enc", 4, 3, **TINY_TRANSUNET), deeper)
    assert report.complete
    assert report.unexpected and all(name.startswith("transformer.vit.blocks.2.") for name in report.unexpected)

    wider = save_encoder(tiny_mae(num_layers=2, mlp_dim=192), tmp_path / "wider")
    report = load_encoder_weights(build_model("transunet_enc", 4, 3, **TINY_TRANSUNET), wider)
    assert not report.complete
    assert {name for name, _, _ in report.mismatched} == {
        f"transformer.vit.blocks.{i}.mlp.{layer}.{kind}"
        for i in range(2)
        for layer in ("linear1", "linear2")
        for kind in ("weight", "bias")
    } - {f"transformer.vit.blocks.{i}.mlp.linear2.bias" for i in range(2)}


def test_mapping_leaves_foreign_keys_for_the_report():
    tensor = torch.zeros(1)
    mapped, skipped = map_mae_to_transunet(
        {"vit.blocks.0.norm1.weight": tensor, "vit.patch_embedding.position_embeddings": tensor, "other": tensor},
        "vit.",
        "transformer.vit.",
    )
    assert set(mapped) == {"transformer.vit.blocks.0.norm1.weight", "other"}
    assert skipped == ["vit.patch_embedding.position_embeddings"]
