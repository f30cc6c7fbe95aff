"""Architecture study: every architecture on one cohort and one budget, as a Ray Tune grid with MLflow children.

::

    study = StudySpec(epochs=8, steps_per_epoch=25)                  # or StudySpec.smoke()
    outcome = run_study(study, Path("data/GLI"), experiment_id=..., mae_encoder="models:/bratstune-mae-encoder@latest")
    print(outcome.markdown)                                          # lesion-wise table, time per step, parameters

Arms (:data:`ARMS`): ``unet``, ``resunet``, ``attention_unet``, ``unetr``, ``segresnet``,
``transunet_enc`` from scratch and initialised from an MAE encoder (``transunet_enc_mae``), and
``transunet_dec``. Each arm takes its architecture's bundled preset (model, loss, optimiser); the
study fixes everything else: patch, batch, epochs x steps, seed, validation cases and rules (the
search default: brats2023 lesion-wise Dice after the default dust removal). The transformer arms
share one ViT size (``vit``), so the MAE encoder fits ``transunet_enc`` (the MAE arm is left out
without an encoder).

The grid is ``tune.grid_search`` over the arm names; each trial is
:func:`bratstune.search.trial.run_trial` of the arm's config (its MLflow child run, reporter and
checkpoints), under one parent run that receives ``study.md`` and ``study.csv``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from bratstune.errors import ConfigError
from bratstune.models import build_model
from bratstune.presets import load_preset
from bratstune.pretrain.config import MaeModelConfig
from bratstune.pretrain.export import save_encoder
from bratstune.pretrain.model import MaskedAutoencoder3D
from bratstune.search.callback import TrialRunCallback, find_trial_run, replay_outage
from bratstune.search.data import prepare_data
from bratstune.search.parent_run import start_parent_run
from bratstune.search.space import SearchSpec, parse_spec
from bratstune.search.trial import TrialContext, outage_spool, run_trial
from bratstune.training.config import load_train_config
from bratstune.training.network import output_channels, resolve_config

logger = logging.getLogger(__name__)

__all__ = ["ARMS", "StudyOutcome", "StudySpec", "arm_values", "run_study", "table_markdown", "untrained_mae_encoder"]

#: arm -> (preset, model kwargs over the preset's); the transformer arms get ``StudySpec.vit`` on top
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet": ("unet", {}),
    "resunet": ("resunet", {}),
    "attention_unet": ("attention_unet", {}),
    "unetr": ("unetr", {}),
    "segresnet": ("segresnet", {}),
    "transunet_enc": ("transunet_enc", {}),
    "transunet_enc_mae": ("transunet_enc", {}),
    "transunet_dec": ("transunet_dec", {}),
}
_VIT_ARMS = ("unetr", "transunet_enc", "transunet_enc_mae")
_CNN_ARMS = ("unet", "resunet", "attention_unet", "transunet_enc", "transunet_enc_mae", "transunet_dec")
#: table columns: (header, metric of the best epoch)
COLUMNS = (
    ("lesion Dice WT", "val/dice_lesion_WT"),
    ("lesion Dice TC", "val/dice_lesion_TC"),
    ("lesion Dice ET", "val/dice_lesion_ET"),
    ("lesion Dice mean", "val/dice_lesion_mean"),
    ("lesion HD95 mean", "val/hd95_lesion_mean"),
    ("lesion recall mean", "val/recall_lesion_mean"),
    ("voxel Dice mean", "val/dice_mean"),
)


@dataclass(frozen=True)
class StudySpec:
    """One cohort, one budget.

    Args:
        arms: arms to run (names of :data:`ARMS`).
        epochs, steps_per_epoch: the budget of every arm (validation after every epoch).
        patch_size: training patch and sliding window.
        filters: CNN widths of the U-Net-like arms (and the TransUNets' CNN).
        vit: ViT of ``unetr`` / ``transunet_enc`` (must match the MAE encoder for the MAE arm).
        val_cases: validation cases scored per epoch (``None``: all held-out cases).
        cpus: CPUs (and torch threads) per trial; trials run one at a time unless ``concurrent``.
        seed: seed of every arm.
    """

    arms: tuple[str, ...] = tuple(ARMS)
    epochs: int = 8
    steps_per_epoch: int = 25
    patch_size: tuple[int, int, int] = (48, 48, 48)
    filters: tuple[int, ...] = (16, 32, 64, 128)
    vit: Mapping[str, int] = field(
        default_factory=lambda: {"hidden_size": 384, "mlp_dim": 1536, "num_heads": 6, "num_layers": 12}
    )
    val_cases: int | None = 4
    cpus: float = 2.0
    concurrent: int = 1
    seed: int = 0
    val_fraction: float = 0.25

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ConfigError(f"study arms: unknown {unknown}; expected some of {list(ARMS)}")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError(
                f"study budget: epochs and steps_per_epoch must be >= 1, got {self.epochs}, {self.steps_per_epoch}"
            )

    @classmethod
    def smoke(cls) -> StudySpec:
        """Tiny CPU study: 32³ patches, narrow CNNs, a 2-layer ViT of width 48, 2 epochs of 2 steps."""
        return cls(
            epochs=2,
            steps_per_epoch=2,
            patch_size=(32, 32, 32),
            filters=(8, 16, 32, 64),
            vit={"hidden_size": 48, "mlp_dim": 96, "num_heads": 3, "num_layers": 2},
            val_cases=1,
            cpus=1.0,
            concurrent=2,
        )

    @property
    def budget(self) -> str:
        p = "x".join(str(v) for v in self.patch_size)
        return f"{self.epochs} epochs x {self.steps_per_epoch} steps, batch 2, {p} patches"

    def base(self) -> dict[str, Any]:
        """What every arm shares (its preset adds model, loss and optimiser)."""
        return {
            "data": {"patch_size": list(self.patch_size), "batch_size": 2, "num_workers": 0},
            "validation": {"overlap": 0.25, "max_cases": self.val_cases},
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "seed": self.seed,
            "challenge": "GLI",
            "device": "cpu",
            "amp": "off",
        }

    def search_spec(self) -> SearchSpec:
        """The study as a (grid-only) search space: one trial per arm, FIFO, its base config."""
        raw = {
            "name": "architecture_study",
            "description": f"architecture study, {self.budget}",
            "num_samples": len(self.arms),
            "max_concurrent_trials": self.concurrent,
            "resources": {"cpu": self.cpus, "gpu": 0},
            "scheduler": {"type": "fifo"},
            "data": {"val_fraction": self.val_fraction, "split_seed": self.seed},
            "base": self.base(),
            "params": {"_arm": {"distribution": "categorical", "choices": list(self.arms)}},
        }
        return parse_spec(raw, where="architecture study")


def arm_values(study: StudySpec, arm: str, *, mae_encoder: str | None = None) -> dict[str, Any]:
    """The trial values of ``arm``: its preset's model / loss / optimiser, the study's widths and ViT."""
    preset_name, extra = ARMS[arm]
    preset = load_preset(preset_name)
    kwargs = {**dict(preset["model"].get("kwargs") or {}), **extra}
    if arm in _CNN_ARMS:
        kwargs["filters"] = list(study.filters)
    if arm == "segresnet":
        kwargs["init_filters"] = int(study.filters[0])
    if arm in _VIT_ARMS:
        kwargs.update({k: v for k, v in study.vit.items() if arm != "unetr" or k != "num_layers"})
    if arm == "transunet_dec":
        kwargs["hidden_size"] = min(int(kwargs.get("hidden_size", 192)), int(study.vit["hidden_size"]))
    values = {"_arm": arm, "model": {"name": preset["model"]["name"], "kwargs": kwargs}}
    values.update({key: preset[key] for key in ("loss", "optim") if key in preset})
    if arm == "transunet_enc_mae":
        if mae_encoder is None:
            raise ConfigError("study arm transunet_enc_mae: give an MAE encoder (--mae-encoder)")
        values["init"] = {"encoder_from": str(mae_encoder), "require_complete": True}
    return values


def untrained_mae_encoder(study: StudySpec, folder: Path) -> Path:
    """An MAE encoder of the study's ViT with its initial weights (``--smoke-test``: exercises the
    MAE arm's loading path, not pre-training); returns its ``encoder.pt``."""
    config = MaeModelConfig(img_size=list(study.patch_size), **dict(study.vit))
    return save_encoder(MaskedAutoencoder3D(config), folder, note="untrained (smoke test)")


def parameter_count(study: StudySpec, values: Mapping[str, Any], scheme: Any) -> int:
    config = resolve_config(load_train_config({**study.base(), **{k: v for k, v in values.items() if k[0] != "_"}}))
    model = build_model(config.model.name, 4, output_channels(config, scheme), **dict(config.model.kwargs))
    return sum(p.numel() for p in model.parameters())


def run_arm(config: dict[str, Any], ctx: TrialContext, arms: Mapping[str, Mapping[str, Any]]) -> None:
    """Function trainable of the grid: the arm's values through :func:`run_trial`."""
    run_trial(dict(arms[config["_arm"]]), ctx)


@dataclass
class StudyOutcome:
    """Rows of the study table and where they were written."""

    rows: list[dict[str, Any]]
    markdown: str
    csv_path: Path
    markdown_path: Path
    parent_run_id: str


def _best_row(result: Any, metric: str) -> dict[str, Any]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return {}
    if metric in frame and frame[metric].notna().any():
        best = frame.loc[frame[metric].idxmax()].to_dict()
    else:
        best = frame.iloc[-1].to_dict()
    for key in ("time/compute_s", "time/data_wait_s"):
        if key in frame:
            best[key] = float(frame[key].mean())
    return best


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_markdown(rows: list[dict[str, Any]], budget: str) -> str:
    """The study table as Markdown (one row per arm)."""
    headers = ["arm", "parameters", "s/step", *[h for h, _ in COLUMNS], "best epoch", "status"]
    lines = [f"Architecture study: {budget}; lesion-wise metrics (brats2023, best epoch).", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    for row in rows:
        cells = [row["arm"], f"{row['parameters'] / 1e6:.2f} M", _fmt(row.get("s_per_step"), 2)]
        cells += [_fmt(row.get(metric), 1 if "hd95" in metric else 3) for _, metric in COLUMNS]
        cells += [_fmt(row.get("best_epoch")), row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _table_csv(rows: list[dict[str, Any]]) -> str:
    fields = ["arm", "parameters", "s_per_step", *[m for _, m in COLUMNS], "best_epoch", "status", "mlflow_run_id"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def run_study(
    study: StudySpec,
    cohort: str | Path,
    *,
    tracking_uri: str,
    experiment_id: str,
    output_dir: str | Path,
    mae_encoder: str | None = None,
    verbose: int = 0,
) -> StudyOutcome:
    """Run the grid (Ray must be initialised), write ``study.md`` / ``study.csv``, log them on the parent run."""
    if mae_encoder is None and "transunet_enc_mae" in study.arms:
        logger.warning("no MAE encoder given: the transunet_enc_mae arm is left out")
        study = replace(study, arms=tuple(a for a in study.arms if a != "transunet_enc_mae"))
    spec = study.search_spec()
    data = prepare_data(spec, cohort)
    arms = {arm: arm_values(study, arm, mae_encoder=mae_encoder) for arm in study.arms}
    client = MlflowClient(tracking_uri)
    name = f"architecture_study-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(output_dir).resolve()
    storage = output_dir / "tune"
    parent = start_parent_run(client, spec, data, experiment_id=experiment_id, name=name, path=str(storage / name))
    client.set_tag(parent, "bratstune.kind", "study")
    ctx = TrialContext(
        search_name=name,
        base=spec.base,
        metric=spec.metric,
        data=data,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        cpus=study.cpus,
        spool_dir=outage_spool(storage, name),
    )
    trainable = tune.with_resources(tune.with_parameters(run_arm, ctx=ctx, arms=arms), spec.resources.as_tune())
    tuner = tune.Tuner(
        trainable,
        param_space={"_arm": tune.grid_search(list(study.arms))},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.concurrent),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[
                TrialRunCallback(tracking_uri, experiment_id, parent, study.epochs, "fifo", spool_dir=ctx.spool_dir)
            ],
            verbose=verbose,
        ),
    )
    status = "FAILED"
    try:
        grid = tuner.fit()
        replay_outage(tracking_uri, experiment_id, parent, ctx.spool_dir)  # what an MLflow outage held back
        rows = []
        for result in grid:
            arm = result.config["_arm"]
            best = _best_row(result, spec.metric)
            step = best.get("time/compute_s", float("nan")) + best.get("time/data_wait_s", 0.0)
            run_id = find_trial_run(client, experiment_id, parent, str(result.metrics.get("trial_id", "")))
            rows.append(
                {
                    "arm": arm,
                    "parameters": parameter_count(study, arms[arm], data.scheme),
                    "s_per_step": step,
                    **{metric: best.get(metric) for _, metric in COLUMNS},
                    "best_epoch": int(best["epoch"]) if best.get("epoch") is not None else None,
                    "status": "error" if result.error else "ok",
                    "mlflow_run_id": run_id or "",
                }
            )
        rows.sort(key=lambda r: list(study.arms).index(r["arm"]))
        markdown = table_markdown(rows, study.budget)
        output_dir.mkdir(parents=True, exist_ok=True)
        md_path, csv_path = output_dir / "study.md", output_dir / "study.csv"
        md_path.write_text(markdown)
        csv_path.write_text(_table_csv(rows))
        client.log_artifact(parent, str(md_path))
        client.log_artifact(parent, str(csv_path))
        status = "FINISHED"
        return StudyOutcome(rows, markdown, csv_path, md_path, parent)
    finally:
        client.set_terminated(parent, status=status)
