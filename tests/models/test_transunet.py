"""3D-TransUNet (``transunet_enc``, ``transunet_dec``): shapes, deep supervision, groups, freezing, a tiny fit."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from bratstune.errors import ConfigError
from bratstune.models import build_model, freeze, layer_groups, parameter_groups, trainable_parameters
from bratstune.models.query_decoder import region_logits, region_probabilities
from bratstune.training.losses import CompoundLoss
from bratstune.training.mask_loss import HungarianMaskLoss

torch.set_num_threads(1)

ENC = {"patch_size": 32, "filters": [8, 16, 32, 64], "hidden_size": 48, "mlp_dim": 96, "num_heads": 3, "num_layers": 2}
DEC = {"patch_size": 32, "filters": [8, 16, 32, 64], "hidden_size": 48, "mlp_dim": 96, "num_heads": 4, "num_queries": 6}


def _model(arch: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, 4, 3, **{**(ENC if arch == "transunet_enc" else DEC), **overrides})


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def _target(batch: int = 2) -> torch.Tensor:
    """Nested WT ⊃ TC ⊃ ET cubes; sample 1 has no ET (an empty region must stay unmatched)."""
    target = torch.zeros(batch, 3, 32, 32, 32)
    target[:, 0, 8:24, 8:24, 8:24] = 1
    target[:, 1, 12:20, 12:20, 12:20] = 1
    target[0, 2, 14:18, 14:18, 14:18] = 1
    return target


# -- forward shapes and deep supervision ---------------------------------------------------------


def test_encoder_only_is_stacked_like_dynunet_in_training_and_plain_in_eval():
    model = _model("transunet_enc", deep_supr_num=2)
    assert model.train()(_x()).shape == (2, 3, 3, 32, 32, 32)  # (B, 1 + deep_supr_num, C, ...)
    with torch.no_grad():
        assert model.eval()(_x()).shape == (2, 3, 32, 32, 32)
    plain = _model("transunet_enc", deep_supervision=False).train()
    assert plain(_x(1)).shape == (1, 3, 32, 32, 32)
    assert model.transformer.grid == (4, 4, 4)  # 32 -> 16 -> 8 -> 4: one token per bottleneck voxel
    assert model.transformer.vit.patch_embedding.position_embeddings.shape == (1, 64, 48)


def test_encoder_only_refuses_another_window_size():
    with pytest.raises(ValueError, match="training patch size"), torch.no_grad():
        _model("transunet_enc").eval()(torch.randn(1, 4, 48, 48, 48))


def test_decoder_only_returns_query_sets_in_training_and_region_logits_in_eval():
    model = _model("transunet_dec", num_layers=3).train()
    out = model(_x())
    assert out["pred_logits"].shape == (2, 6, 4)  # N = 6 queries, K + 1 = 3 regions + no object
    assert out["pred_masks"].shape == (2, 6, 32, 32, 32)
    assert len(out["aux_outputs"]) == 2  # after layers 1 and 2; the final set is the main output
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 6, 4) and aux["pred_masks"].shape == (2, 6, 32, 32, 32)
        assert not torch.equal(aux["pred_masks"], out["pred_masks"])
    with torch.no_grad():
        logits = model.eval()(_x())
    assert logits.shape == (2, 3, 32, 32, 32)
    # instance norm without running statistics and no dropout: train and eval agree, so the
    # eval output is exactly the region conversion of the training-mode query set
    expected = region_logits(out["pred_logits"].detach(), out["pred_masks"].detach())
    assert torch.allclose(logits, expected, atol=1e-5)
    assert "aux_outputs" not in _model("transunet_dec", deep_supervision=False).train()(_x(1))


def test_decoder_only_layers_attend_one_scale_each():
    model = _model("transunet_dec")
    assert model.query_levels == (3, 2, 1)  # 4^3, 8^3, 16^3: coarse to fine, not the full resolution
    widths = [proj.in_channels for proj in model.query_decoder.input_proj]
    assert widths == [64, 32, 16]
    assert len(model.query_decoder.layers) == 3
    assert _model("transunet_dec", query_levels=[2]).query_decoder.input_proj[0].in_channels == 32


def test_region_probabilities_by_hand():
    # 2 queries, 2 regions (+ no object), 2 voxels
    class_logits = torch.log(torch.tensor([[[0.6, 0.2, 0.2], [0.1, 0.7, 0.2]]]))
    mask_logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), -math.log(3.0)]]])  # sigmoid .5 .75 / .75 .25
    probs = region_probabilities(class_logits, mask_logits)
    # region 0: max(0.6 * [.5, .75], 0.1 * [.75, .25]) = [.3, .45]; region 1: max(0.2 * ..., 0.7 * ...)
    expected = torch.tensor([[[0.30, 0.45], [0.525, 0.175]]])
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(torch.sigmoid(region_logits(class_logits, mask_logits)), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["transunet_dec"])
def test_decoder_only_deepcopies_and_pickles(arch):
    model = _model(arch).eval()
    with torch.no_grad():
        before = model(_x(1))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(clone(_x(1)), before)


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("transunet_enc", {"patch_size": 8}, "at least 3"),
        ("transunet_enc", {"hidden_size": 50, "num_heads": 3}, "divisible by num_heads"),
        ("transunet_enc", {"norm": "instnce"}, "did you mean 'instance'"),
        ("transunet_enc", {"patch_size": 32, "filters": [8, 16, 32, 64], "deep_supr_num": 3}, "between 1 and 2"),
        ("transunet_dec", {"hidden_size": 64, "num_heads": 4}, "divisible by 6"),
        ("transunet_dec", {"num_queries": 2}, "at least the number of regions"),
        ("transunet_dec", {"patch_size": 32, "filters": [8, 16, 32, 64], "query_levels": [4]}, r"in \[0, 3\]"),
        ("transunet_dec", {"queries": 8}, "did you mean 'num_queries'"),
    ],
)
def test_bad_options_name_the_problem(arch, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_model(arch, 4, 3, **kwargs)


# -- groups and freezing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (
            "transunet_enc",
            {"encoder": ["encoder"], "middle": ["transformer"], "decoder": ["decoder"], "head": ["out", "ds_heads"]},
        ),
        (
            "transunet_dec",
            {"encoder": ["encoder"], "middle": ["query_decoder"], "decoder": ["decoder"], "head": ["query_head"]},
        ),
    ],
)
def test_every_parameter_is_in_exactly_one_named_group(arch, expected):
    model = _model(arch)
    assert layer_groups(model) == expected
    names = parameter_groups(model)  # raises on a parameter in zero or two groups
    flat = [n for group in names.values() for n in group]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters()) and len(flat) == len(set(flat))
    assert all(names.values())
    assert not any("norm_cross_attn" in n for n in flat)  # MONAI's unused LayerNorm is removed


def _loss(arch: str):
    if arch == "transunet_dec":
        return lambda out, target: HungarianMaskLoss({"ce": 0.7, "dice": 0.3})(out, target)
    compound = CompoundLoss({"dice": 1.0, "ce": 1.0})
    return lambda out, target: sum(compound(head, target) for head in out.unbind(dim=1))


@pytest.mark.parametrize(
    ("arch", "frozen_groups"), [("transunet_enc", ["middle"]), ("transunet_dec", ["encoder", "middle"])]
)
def test_frozen_groups_stay_bit_identical_after_optimiser_steps(arch, frozen_groups):
    model = _model(arch)
    names = freeze(model, frozen_groups)
    groups = parameter_groups(model)
    assert sorted(names) == sorted(n for g in frozen_groups for n in groups[g])
    live = [n for g in groups if g not in frozen_groups for n in groups[g]]
    params = dict(model.named_parameters())
    assert {id(p) for p in trainable_parameters(model)} == {id(params[n]) for n in live}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    loss_fn = _loss(arch)
    for _ in range(2):
        model.train()
        loss = loss_fn(model(_x()), _target())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for name in names:
        assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    for name in live:
        assert not torch.equal(before[name], after[name]), f"trainable {name} did not change"


# -- a tiny fit of each variant -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four preprocessed procedural GLI cases at 32^3 (3 train, 1 validation)."""
    from bratstune.data.cache import CaseCache
    from bratstune.data.cohort import TrainData
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import PreprocessConfig
    from bratstune.data.synthetic import generate_cohort
    from bratstune.labels import scheme_for

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root / "raw", challenge="GLI", cases=4, shape=(32, 32, 32), anatomy="procedural", seed=0, workers=1)
    cases = CaseCache(root / "cache").prepare(discover(root / "raw").cases, PreprocessConfig())
    return TrainData(train=cases[:3], val=cases[3:], scheme=scheme_for("GLI"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "kwargs", "weights"),
    [
        ("transunet_enc", {k: v for k, v in ENC.items() if k != "patch_size"}, {"dice": 1.0, "ce": 1.0}),
        ("transunet_dec", {k: v for k, v in DEC.items() if k != "patch_size"}, {"ce": 0.7, "dice": 0.3}),
    ],
)
def test_two_epoch_fit_trains_and_validates(arch, kwargs, weights, cohort, tmp_path):
    from bratstune.models.network import NetworkSpec, build_network, load_model_weights
    from bratstune.training.fit import fit

    config = {
        "model": {"name": arch, "kwargs": kwargs},
        "loss": {"weights": weights, "mode": "region"},
        "optim": {"name": "adamw", "lr": 3.0e-3, "schedule": "cosine", "warmup_fraction": 0.1},
        "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0},
        "validation": {"metric": "val/dice_mean", "lesion_metrics": False},
        "epochs": 2,
        "steps_per_epoch": 2,
        "num_threads": 1,
        "challenge": "GLI",
    }
    result = fit(config, cohort, out_dir=tmp_path)
    assert result.epochs_completed == 2
    assert all(math.isfinite(row["train/loss"]) for row in result.history)
    validated = [row for row in result.history if "val/dice_mean" in row]
    assert len(validated) == 2 and all(0.0 <= row["val/dice_mean"] <= 1.0 for row in validated)
    assert result.best_dir is not None and (result.best_dir / "model.pt").is_file()
    # the saved config rebuilds the network that the package / prediction path would load
    rebuilt = build_network(NetworkSpec.from_config(result.config.to_dict()), cohort.scheme)
    load_model_weights(rebuilt, result.best_dir)
    assert rebuilt.bratstune_arch == arch
