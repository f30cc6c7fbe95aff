"""bratstune.transfer: frozen groups stay bit-identical, GLI -> PED head remapping, missing modalities.

Tiny procedural 32^3 cohorts, a seeded (untrained) GLI unet [8, 16, 32] saved as a best-model
folder, 1 epoch x 3 steps of fine-tuning; the file takes well under a minute on one thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bratstune.errors import DataError

CONFIG = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
    "loss": {"weights": {"dice": 1.0, "ce": 1.0}, "mode": "region"},
    "optim": {"name": "adam", "lr": 1.0e-2, "schedule": "constant", "warmup_fraction": 0.0},
    "data": {"patch_size": [24, 24, 24], "batch_size": 2, "fg_prob": 0.7, "num_workers": 0},
    "validation": {"overlap": 0.25, "metric": "val/dice_mean"},
    "epochs": 1,
    "steps_per_epoch": 3,
    "seed": 0,
    "num_threads": 1,
    "challenge": "GLI",
}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    """A GLI best-model folder (model.pt + config.yaml) of a seeded unet."""
    from bratstune.labels import scheme_for
    from bratstune.training.checkpoint import save_best
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    torch.manual_seed(123)
    config = resolve_config(load_train_config(CONFIG))
    model = build_network(config, scheme_for("GLI"))
    folder = tmp_path_factory.mktemp("source") / "best"
    save_best(folder, model=model, config=config.to_dict(), metrics={})
    return folder


def _cohort(tmp_path_factory, challenge: str, cases: int = 4) -> Path:
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp(f"cohort-{challenge}") / "raw"
    generate_cohort(root, challenge=challenge, cases=cases, shape=(32, 32, 32), anatomy="procedural", seed=1, workers=1)
    return root


@pytest.fixture(scope="module")
def ssa_data(tmp_path_factory, source_dir):
    from bratstune.transfer import load_source, prepare_target

    root = _cohort(tmp_path_factory, "SSA")
    data, challenge = prepare_target(
        root, load_source(source_dir), val_fraction=0.25, cache_root=tmp_path_factory.mktemp("cache")
    )
    assert challenge == "SSA"
    return data


def _tensors(state: dict, prefixes: list[str]) -> dict:
    return {k: v for k, v in state.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("frozen, changed", [("decoder", "encoder"), ("encoder", "decoder")])
def test_frozen_group_bit_identical(tmp_path, source_dir, ssa_data, frozen, changed):
    from bratstune.models import layer_groups
    from bratstune.transfer import finetune, load_source

    source = load_source(source_dir)
    before = {k: v.clone() for k, v in source.model.state_dict().items()}
    result = finetune(
        source, ssa_data, {"steps_per_epoch": 3}, freeze=[frozen], out_dir=tmp_path / "ft", challenge="SSA"
    )
    groups = layer_groups(result.model)
    after = result.model.state_dict()
    kept = _tensors(after, groups[frozen])
    assert kept
    for name, tensor in kept.items():
        assert torch.equal(tensor, before[name]), f"{name} ({frozen}, frozen) changed"
    moved = _tensors(after, groups[changed])
    assert any(not torch.equal(t, before[k]) for k, t in moved.items() if t.is_floating_point()), f"{changed} unchanged"
    assert result.config.freeze == (frozen,)
    assert result.config.challenge == "SSA"
    assert (tmp_path / "ft" / "transfer.json").is_file()
    assert any(k.startswith("val/dice_lesion") for k in result.best_metrics)


def test_gli_to_ped_remaps_head(tmp_path, tmp_path_factory, source_dir, caplog):
    import logging

    from bratstune.inference.outputs import decode_prediction
    from bratstune.inference.sliding_window import predict_probabilities
    from bratstune.labels import scheme_for
    from bratstune.transfer import finetune, load_source, prepare_target, remap_head

    source = load_source(source_dir)
    ped = scheme_for("PED")
    with caplog.at_level(logging.INFO, logger="bratstune.transfer"):
        model, mapping = remap_head(source.model, source.config, source.scheme, ped)
    assert mapping == {"WT": "WT", "TC": "TC", "CC": None, "ET": "ET"}
    assert "re-initialised ['CC']" in caplog.text
    src = source.model.state_dict()
    dst = model.state_dict()
    weight = "output_block.conv.conv.weight"
    assert dst[weight].shape[0] == 4 and src[weight].shape[0] == 3
    for d, s in ((0, 0), (1, 1), (3, 2)):  # WT, TC, ET rows
        assert torch.equal(dst[weight][d], src[weight][s])
    assert torch.equal(dst["bottleneck.conv1.conv.weight"], src["bottleneck.conv1.conv.weight"])

    root = _cohort(tmp_path_factory, "PED")
    data, challenge = prepare_target(root, source, val_fraction=0.25, cache_root=tmp_path / "cache")
    assert challenge == "PED" and data.scheme.name == "brats2024_ped"
    result = finetune(source, data, {"optim.lr": 1e-2}, freeze=[], out_dir=tmp_path / "ft", challenge="PED")
    assert result.transfer["mapping"]["CC"] is None
    out = result.model.state_dict()[weight]
    assert out.shape[0] == len(ped.train_regions)
    from bratstune.training.fit import inference_settings

    case = data.val[0]
    probs = predict_probabilities(result.model, case.image, inference_settings(result.config))
    assert probs.shape[0] == 4
    labels = decode_prediction(probs, ped, "region")
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 4}


def test_missing_modality_refused_unless_filled(tmp_path, tmp_path_factory, source_dir):
    from bratstune.transfer import check_modalities, load_source, prepare_target

    root = _cohort(tmp_path_factory, "SSA", cases=3)
    victim = sorted(root.glob("*/*-t1n.nii.gz"))[0]
    victim.unlink()
    source = load_source(source_dir)
    with pytest.raises(DataError) as info:
        check_modalities(source.modalities, root)
    message = str(info.value)
    assert "t1n" in message and victim.name in message and "fill" in message
    with pytest.raises(DataError):
        prepare_target(root, source, cache_root=tmp_path / "cache")
    needed = check_modalities(source.modalities, root, {"t1n": "zeros"})
    assert list(needed.values()) == [{"t1n": "zeros"}]
    data, _ = prepare_target(
        root,
        source,
        fill={"t1n": "t1c"},
        val_fraction=0.0,
        cache_root=tmp_path / "cache",
        filled_dir=tmp_path / "filled",
    )
    assert len(data.train) == 3
    assert (tmp_path / "filled" / victim.parent.name / victim.name).exists()
