"""bratstune.training.fit.fit and its pieces (config, schedules, loss heads, checkpoints, validation).

Everything runs on the CPU with one thread on a tiny procedural cohort (32^3 volumes, cropped
to about 18x24x28 around the brain) and 24-32^3 patches; the whole file takes about a minute.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bratstune.data.cohort import TrainData
from bratstune.errors import ConfigError, DataError
from bratstune.training.config import TrainConfig, load_train_config
from bratstune.training.fit import compute_loss, fit, load_network
from bratstune.training.report import EpochReport

#: Tiny kwargs per architecture (as in tests/models/conftest.py); unet gets 3 levels at 24^3.
TINY: dict[str, dict] = {
    "unet": {"filters": [8, 16, 32, 64], "deep_supr_num": 1},
    "resunet": {"filters": [8, 16, 32, 64], "num_res_units": 1},
    "attention_unet": {"filters": [8, 16, 32, 64]},
    "unetr": {"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
    "swin_unetr": {"feature_size": 12, "norm": "batch"},
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1, 1, 1], "blocks_up": [1, 1, 1]},
}


def tiny_config(**changes) -> dict:
    """A 24^3 unet run: 2 epochs x 8 steps of batch 2, in-process loading, one thread."""
    config = {
        "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
        "loss": {"weights": {"dice": 1.0, "ce": 1.0}, "mode": "region"},
        "optim": {"name": "adam", "lr": 1.0e-2, "schedule": "cosine", "warmup_fraction": 0.1, "grad_clip": 12.0},
        "data": {"patch_size": [24, 24, 24], "batch_size": 2, "fg_prob": 0.7, "num_workers": 0},
        "validation": {"overlap": 0.25, "metric": "val/dice_mean"},
        "epochs": 2,
        "steps_per_epoch": 8,
        "seed": 0,
        "num_threads": 1,
        "challenge": "GLI",
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six preprocessed procedural GLI cases (5 train, 1 validation) and their scheme."""
    from bratstune.data.cache import CaseCache
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import PreprocessConfig
    from bratstune.data.synthetic import generate_cohort
    from bratstune.labels import scheme_for

    root = tmp_path_factory.mktemp("cohort")
    generate_cohort(root / "raw", challenge="GLI", cases=6, shape=(32, 32, 32), anatomy="procedural", seed=0, workers=1)
    cases = CaseCache(root / "cache").prepare(discover(root / "raw").cases, PreprocessConfig())
    return TrainData(train=cases[:5], val=cases[5:], scheme=scheme_for("GLI"))


@pytest.fixture(scope="module")
def unet_run(cohort, tmp_path_factory):
    """One 2-epoch unet run; keeps every report and a copy of the epoch-1 checkpoint."""
    out = tmp_path_factory.mktemp("unet-run")
    reports: list[EpochReport] = []

    def reporter(report: EpochReport) -> None:
        reports.append(report)
        if report.epoch == 1:
            shutil.copytree(report.checkpoint_dir, out / "saved-epoch-1")

    result = fit(tiny_config(), cohort, reporter=reporter, out_dir=out / "run")
    return result, reports, out


# -- fit -----------------------------------------------------------------------------------------


def test_fit_finishes_and_loss_decreases(unet_run):
    result, _, _ = unet_run
    losses = [row["train/loss"] for row in result.history]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert result.epochs_completed == 2


def test_reporter_receives_every_epoch_with_metrics_and_checkpoint(unet_run):
    result, reports, _ = unet_run
    assert [r.epoch for r in reports] == [1, 2]
    for report in reports:
        assert report.validated
        for key in (
            "train/loss",
            "train/lr",
            "time/data_wait_s",
            "time/compute_s",
            "time/epoch_s",
            "val/dice_WT",
            "val/dice_TC",
            "val/dice_ET",
            "val/dice_mean",
        ):
            assert key in report.metrics, key
        assert 0.0 <= report.metrics["val/dice_mean"] <= 1.0
        assert report.metrics["time/data_wait_s"] >= 0 and report.metrics["time/compute_s"] > 0
        assert report.checkpoint_dir is not None and report.checkpoint_dir.name == f"epoch_{report.epoch:04d}"
    assert reports[0].is_best  # the first validation is always the best so far
    # lesion-wise metrics from bratstune.metrics
    assert {"val/dice_lesion_ET", "val/dice_lesion_mean", "val/hd95_lesion_WT"} <= set(reports[-1].metrics)
    # only the latest resumable checkpoint is kept on disk
    assert [p.name for p in (result.out_dir / "checkpoints").iterdir()] == ["epoch_0002"]


def test_best_checkpoint_matches_best_metric(unet_run, cohort):
    result, reports, _ = unet_run
    best = max(reports, key=lambda r: r.metrics["val/dice_mean"])
    assert result.best_epoch == best.epoch
    assert result.best_metric == pytest.approx(best.metrics["val/dice_mean"])
    assert result.best_metrics["epoch"] == best.epoch
    model, config = load_network(result.best_dir, cohort.scheme)
    assert config.model.kwargs["patch_size"] == [24, 24, 24]  # resolved config saved with the weights
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, result.model.state_dict()[name])


def _state(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def test_resume_continues_at_the_next_epoch_with_the_same_optimiser_state(unet_run, cohort, tmp_path):
    result, _, out = unet_run
    saved = out / "saved-epoch-1"
    before = _state(saved)
    assert before["epoch"] == 1 and before["global_step"] == 8

    reports: list[EpochReport] = []
    resumed = fit(tiny_config(), cohort, reporter=reports.append, out_dir=tmp_path / "resumed", resume_from=saved)

    assert [r.epoch for r in reports] == [2]  # continues at epoch 2, does not redo epoch 1
    assert resumed.epochs_completed == 2
    assert len(resumed.history) == 2  # epoch 1 comes from the checkpoint
    # Same data stream, RNG and optimiser state: the resumed run ends where the uninterrupted one did.
    full = _state(result.last_checkpoint)
    again = _state(resumed.last_checkpoint)
    assert again["global_step"] == full["global_step"] == 16
    opt_full, opt_again = full["optimizer"], again["optimizer"]
    assert opt_full["param_groups"][0]["lr"] == pytest.approx(opt_again["param_groups"][0]["lr"])
    assert set(opt_full["state"]) == set(opt_again["state"])
    for index, slots in opt_full["state"].items():
        for slot, tensor in slots.items():
            torch.testing.assert_close(opt_again["state"][index][slot], tensor, rtol=1e-4, atol=1e-6)
    for name, tensor in full["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=1e-4, atol=1e-6)
    assert again["scheduler"]["last_epoch"] == full["scheduler"]["last_epoch"]
    # the checkpoint carries the best model, so resuming into a new folder keeps it
    assert resumed.best_epoch == result.best_epoch and resumed.best_dir is not None
    assert (resumed.last_checkpoint / "best" / "model.pt").is_file()


def test_resume_restores_optimiser_state_exactly(unet_run, cohort):
    """Loading a checkpoint puts back the optimiser tensors bit for bit."""
    from bratstune.training.checkpoint import load_state
    from bratstune.training.fit import build_network
    from bratstune.training.schedules import build_optimizer, build_scheduler

    _, _, out = unet_run
    config = load_train_config(tiny_config())
    model = build_network(config, cohort.scheme)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, total_steps=16, steps_per_epoch=8)
    state = load_state(out / "saved-epoch-1", model=model, optimizer=optimizer, scheduler=scheduler, scaler=None)
    saved = _state(out / "saved-epoch-1")["optimizer"]
    assert state.epoch == 1 and state.best_epoch == 1
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, tensor in slots.items():
            assert torch.equal(tensor, saved["state"][index][slot])
    assert scheduler.last_epoch == 8


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_architecture_trains(arch, cohort, tmp_path):
    config = tiny_config(
        **{
            "model.name": arch,
            "model.kwargs": TINY[arch],
            "data.patch_size": [32, 32, 32],
            "optim.lr": 3.0e-3,
            "steps_per_epoch": 3,
        }
    )
    data = TrainData(train=cohort.train, val=[], scheme=cohort.scheme)
    result = fit(config, data, out_dir=tmp_path)
    losses = [row["train/loss"] for row in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert result.best_dir is None and result.best_metric is None  # no validation cases


def test_init_from_weights_and_frozen_encoder(unet_run, cohort, tmp_path):
    from bratstune.models import layer_groups

    result, _, _ = unet_run
    weights = torch.load(result.best_dir / "model.pt", weights_only=True)
    torch.save({"model": {f"encoder.{k}": v for k, v in weights.items()}}, tmp_path / "encoder.pt")
    config = tiny_config(
        **{
            "init.encoder_from": str(tmp_path / "encoder.pt"),
            "init.strip_prefix": "encoder.",
            "freeze": ["encoder"],
            "epochs": 1,
            "steps_per_epoch": 2,
        }
    )
    trained = fit(config, TrainData(cohort.train, [], cohort.scheme), out_dir=tmp_path / "run").model.state_dict()
    prefixes = layer_groups(result.model)["encoder"]  # same architecture
    frozen = [k for k in weights if any(k == p or k.startswith(p + ".") for p in prefixes)]
    assert frozen
    for name in frozen:  # loaded and kept frozen (running statistics included)
        assert torch.equal(trained[name], weights[name]), name
    assert not torch.equal(trained["output_block.conv.conv.weight"], weights["output_block.conv.conv.weight"])


_CRASH = """
import os, sys, torch
from bratstune.training import checkpoint
folder, stage = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(2, 1)
torch.nn.init.constant_(model.weight, 2.0)
real_replace = os.replace
def crash(src, dst):  # die for real (no finally, no atexit) at the chosen step
    if stage == "between-renames" and str(src).endswith(".tmp"):
        os._exit(3)
    real_replace(src, dst)
checkpoint.os.replace = crash
if stage == "while-writing":
    checkpoint.torch.save = lambda *a, **k: os._exit(3)
checkpoint.save_best(folder, model=model, config={"v": 2}, metrics={})
"""


@pytest.mark.parametrize("stage, expected", [("while-writing", 1.0), ("between-renames", 2.0)])
def test_a_crash_while_replacing_a_checkpoint_leaves_a_complete_folder(tmp_path, stage, expected):
    """Unique temp names; killed mid-write: the old folder; killed between the renames: the new one."""
    import subprocess
    import sys

    from bratstune.training.checkpoint import recover_dir, resolve_state_file, save_best

    model = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(model.weight, 1.0)
    folder = tmp_path / "best"
    save_best(folder, model=model, config={"v": 1}, metrics={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no .tmp / .old left by a clean write
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(folder), stage], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name != "best")
    assert hidden and all(re.fullmatch(r"\.best\.\d+-[0-9a-f]{32}\.(tmp|old)", h) for h in hidden), hidden
    assert (folder.exists(), stage) in ((True, "while-writing"), (False, "between-renames"))
    recover_dir(folder)
    weights = torch.load(folder / "model.pt", weights_only=True)["weight"]
    assert torch.all(weights == expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"], "the dead writer's folders were not removed"
    with pytest.raises(DataError, match="no training checkpoint"):
        resolve_state_file(folder)  # a best-model folder is no checkpoint; the check itself runs recovery


def test_label_mode_and_validation_every_n_epochs(cohort, tmp_path):
    reports: list[EpochReport] = []
    config = tiny_config(
        **{
            "loss.mode": "label",
            "epochs": 3,
            "steps_per_epoch": 2,
            "validation.every_n_epochs": 2,
            "validation.lesion_metrics": False,
            "optim.schedule": "poly",
            "optim.name": "sgd",
        }
    )
    result = fit(config, cohort, reporter=reports.append, out_dir=tmp_path)
    assert [r.validated for r in reports] == [False, True, True]  # every 2nd epoch and the last
    assert "val/dice_mean" not in reports[0].metrics
    assert reports[1].metrics["val/epoch"] == 2
    assert result.model(torch.zeros(1, 4, 24, 24, 24)).shape[1] == 4  # background + 3 labels
    assert "val/dice_lesion_mean" not in reports[-1].metrics


def test_fit_rejects_bad_input(cohort, tmp_path):
    with pytest.raises(DataError, match="no training cases"):
        fit(tiny_config(), TrainData(train=[], val=[], scheme=cohort.scheme), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'steps_per_epoch'"):
        fit({"step_per_epoch": 3}, cohort, out_dir=tmp_path)


# -- config --------------------------------------------------------------------------------------


def test_config_defaults_and_yaml_shape():
    config = load_train_config(
        {
            "model": {"name": "unet", "kwargs": {"filters": [16, 32, 64, 128]}},
            "loss": {"weights": {"dice": 1.0, "ce": 1.0}, "mode": "region", "alpha": 0.3, "beta": 0.7, "gamma": 2.0},
            "optim": {
                "name": "adam",
                "lr": 1.0e-3,
                "weight_decay": 0.0,
                "schedule": "cosine",
                "warmup_fraction": 0.02,
                "grad_clip": 12.0,
            },
            "data": {"patch_size": [48, 48, 48], "batch_size": 2, "fg_prob": 0.7},
            "epochs": 30,
            "steps_per_epoch": 50,
        }
    )
    assert config.data.patch_size == (48, 48, 48)
    assert config.total_steps == 1500
    assert config.validation.metric == "val/dice_mean" and config.amp == "auto" and config.device == "auto"
    assert load_train_config(config.to_dict()) == config  # round trip
    assert load_train_config({"data": {"patch_size": 32}}).data.patch_size == (32, 32, 32)


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"optim": {"nam": "adam"}}, "did you mean 'name'"),
        ({"optim": {"name": "adamx"}}, "did you mean 'adam"),
        ({"optim": {"schedule": "cosin"}}, "did you mean 'cosine'"),
        ({"loss": {"mode": "regions"}}, "did you mean 'region'"),
        ({"amp": "yes"}, "unknown amp"),
        ({"data": {"patch_size": [48, 48]}}, "patch_size"),
        ({"validation": {"metric": "dice_mean"}}, "val/dice_mean"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_config_errors_name_the_key(mapping, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(mapping)


def test_every_preset_loads():
    from bratstune.presets import list_presets, load_preset

    for name in list_presets():
        assert isinstance(load_train_config(load_preset(name)), TrainConfig)


# -- schedules, loss heads, metrics ---------------------------------------------------------------


def _lrs(**optim) -> list[float]:
    from bratstune.training.schedules import build_optimizer, build_scheduler

    config = load_train_config({"optim": {"lr": 1.0, **optim}}).optim
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    scheduler = build_scheduler(optimizer, config, total_steps=10, steps_per_epoch=5)
    out = []
    for _ in range(10):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_schedule_with_linear_warmup():
    lrs = _lrs(schedule="cosine", warmup_fraction=0.2)  # 2 warm-up steps
    assert lrs[0] == pytest.approx(1 / 3) and lrs[1] == pytest.approx(2 / 3) and lrs[2] == pytest.approx(1.0)
    assert lrs[2:] == sorted(lrs[2:], reverse=True)
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize(
    ("optim", "expected"),
    [
        ({"schedule": "poly", "power": 1.0, "warmup_fraction": 0.0}, [1 - i / 10 for i in range(10)]),
        ({"schedule": "exponential", "decay": 0.5, "warmup_fraction": 0.0}, [0.5 ** (i / 5) for i in range(10)]),
        ({"schedule": "constant", "warmup_fraction": 0.0}, [1.0] * 10),
    ],
)
def test_other_schedules(optim, expected):
    assert _lrs(**optim) == pytest.approx(expected)


def test_compute_loss_weights_deep_supervision_heads():
    from bratstune.training.losses import CompoundLoss

    torch.manual_seed(0)
    loss_fn = CompoundLoss({"dice": 1.0, "ce": 1.0})
    target = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    heads = torch.randn(2, 3, 3, 8, 8, 8)  # DynUNet training output (B, S, C, X, Y, Z)
    expected = sum(w * loss_fn(heads[:, i], target) for i, w in enumerate([4 / 7, 2 / 7, 1 / 7]))
    assert compute_loss(loss_fn, heads, target, deep_supervision=True) == pytest.approx(float(expected), rel=1e-5)
    main_only = compute_loss(loss_fn, heads, target, deep_supervision=False)
    assert main_only == pytest.approx(float(loss_fn(heads[:, 0], target)))


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ([0, 2, 2, 1], [0, 2, 1, 1], {"WT": 1.0, "TC": 2 / 3, "ET": 1.0}),  # ET empty in both -> 1
        ([3, 3, 0, 0], [3, 0, 0, 0], {"WT": 2 / 3, "TC": 2 / 3, "ET": 2 / 3}),
        ([0, 0, 0, 0], [2, 0, 0, 0], {"WT": 0.0, "TC": 1.0, "ET": 1.0}),
    ],
)
def test_region_dice(pred, ref, expected):
    from bratstune.labels import scheme_for
    from bratstune.training.validate import region_dice

    got = region_dice(np.array(pred).reshape(1, 1, 4), np.array(ref).reshape(1, 1, 4), scheme_for("GLI"))
    assert got == pytest.approx(expected)


def test_label_class_round_trip_for_legacy_labels():
    from bratstune.inference.outputs import classes_to_labels, labels_to_classes
    from bratstune.labels import get_scheme

    legacy = get_scheme("legacy")  # labels 1, 2, 4
    seg = np.array([0, 1, 2, 4], dtype=np.uint8)
    assert labels_to_classes(seg, legacy).tolist() == [0, 1, 2, 3]
    assert classes_to_labels(labels_to_classes(seg, legacy), legacy).tolist() == [0, 1, 2, 4]


def test_device_and_amp_choice():
    from bratstune.device import amp_dtype, needs_grad_scaler, select_device

    cpu = torch.device("cpu")
    assert select_device("cpu") == cpu
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "on") == torch.bfloat16 and amp_dtype(cpu, "off") is None
    assert not needs_grad_scaler(cpu, torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            select_device("cuda")


def test_split_train_val_is_stratified_and_complete(cohort):
    from bratstune.data.cohort import split_train_val

    cases = list(cohort.train) + list(cohort.val)
    data = split_train_val(cases, cohort.scheme, val_fraction=0.5, seed=0)
    assert len(data.train) == 3 and len(data.val) == 3
    assert sorted(c.case_id for c in data.train + data.val) == sorted(c.case_id for c in cases)
    assert split_train_val(cases, cohort.scheme, val_fraction=0.5, seed=0).val[0].case_id == data.val[0].case_id
    assert len(split_train_val(cases, cohort.scheme, val_fraction=0.0).val) == 0
    assert len(split_train_val(cases, cohort.scheme, val_fraction=0.2).val) == 1
    with pytest.raises(ConfigError, match="val_fraction"):
        split_train_val(cases, cohort.scheme, val_fraction=1.0)
