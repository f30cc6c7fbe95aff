from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.nn.modules.batchnorm import _NormBase

from bratstune.errors import ConfigError
from bratstune.models import (
    ARCHITECTURES,
    GROUPS,
    freeze,
    frozen_parameter_names,
    layer_groups,
    parameter_groups,
    set_train_mode,
    trainable_parameters,
    unfreeze,
)

torch.set_num_threads(1)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A few Adam steps with weight decay (which would move any parameter it is given)."""
    opt = torch.optim.Adam(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 32, generator=gen)
    for _ in range(steps):
        model.train()  # what a training loop does every epoch: must not unfreeze norm statistics
        out = model(x)  # unet: (B, S, C, ...) in training mode, all heads used below
        if isinstance(out, dict):  # transunet_dec: a query set; its masks depend on every group
            out = out["pred_masks"]
        loss = (out - 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_frozen_weights_and_statistics_stay_bit_identical(arch, tiny_model):
    model = tiny_model(arch)
    frozen_groups = ["encoder", "head"]
    prefixes = [p for g in frozen_groups for p in layer_groups(model)[g]]
    names = freeze(model, frozen_groups)

    groups = parameter_groups(model)
    assert sorted(names) == sorted(groups["encoder"] + groups["head"])
    assert sorted(frozen_parameter_names(model)) == sorted(names)
    trainable = {id(p) for p in trainable_parameters(model)}
    params = dict(model.named_parameters())
    assert trainable == {id(params[n]) for n in groups["middle"] + groups["decoder"]}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    after = model.state_dict()

    frozen_keys = [k for k in before if _under(k, prefixes)]
    assert frozen_keys
    for key in frozen_keys:  # parameters and buffers (running_mean/var, num_batches_tracked)
        assert torch.equal(before[key], after[key]), f"{arch}: frozen {key} changed"
    for name in groups["middle"] + groups["decoder"]:
        assert not torch.equal(before[name], after[name]), f"{arch}: trainable {name} did not change"


@pytest.mark.parametrize(
    ("arch", "overrides"), [("attention_unet", {}), ("unet", {"norm": "batch"}), ("swin_unetr", {})]
)
def test_frozen_batch_norm_keeps_running_stats_while_unfrozen_ones_update(arch, overrides, tiny_model):
    model = tiny_model(arch, **overrides)
    groups = layer_groups(model)
    prefixes = groups["encoder"] + groups["middle"]  # SwinUNETR's transformer has no batch norm
    freeze(model, ["encoder", "middle"])
    norms = {n: m for n, m in model.named_modules() if isinstance(m, _NormBase) and m.track_running_stats}
    frozen = [n for n in norms if _under(n, prefixes)]
    live = [n for n in norms if not _under(n, prefixes)]
    assert frozen and live
    before = {n: norms[n].running_mean.clone() for n in norms}
    _train_steps(model, steps=2)
    for n in frozen:
        assert torch.equal(before[n], norms[n].running_mean), n
        assert not norms[n].training
    assert any(not torch.equal(before[n], norms[n].running_mean) for n in live)


def test_set_train_mode_and_unfreeze(tiny_model):
    model = tiny_model("attention_unet")
    freeze(model, "encoder")
    encoder_norm = model.model[0].conv[0].adn.N
    model.train()
    assert encoder_norm.training  # plain .train() flips it back until the next forward ...
    set_train_mode(model)
    assert not encoder_norm.training and model.training  # ... set_train_mode fixes it at once
    unfreeze(model)
    assert not frozen_parameter_names(model)
    model.train()
    model(torch.randn(2, 4, 32, 32, 32))
    assert encoder_norm.training  # hook is inert after unfreeze


def test_frozen_model_deepcopies_and_pickles(tiny_model):
    model = tiny_model("attention_unet")
    freeze(model, ["encoder"])
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert sorted(frozen_parameter_names(clone)) == sorted(frozen_parameter_names(model))
        clone.train()
        clone(torch.randn(2, 4, 32, 32, 32))
        assert not clone.model[0].conv[0].adn.N.training


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_can_be_frozen_alone(group, tiny_model):
    model = tiny_model("segresnet")
    names = freeze(model, [group])
    assert names and sorted(names) == sorted(parameter_groups(model)[group])


def test_unknown_group_name(tiny_model):
    with pytest.raises(ConfigError, match="unknown layer group 'decoders' \\(did you mean 'decoder'\\?\\)"):
        freeze(tiny_model("unet"), ["decoders"])
