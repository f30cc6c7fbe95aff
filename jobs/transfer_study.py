"""Transfer study: baselines and fine-tuning with each frozen configuration, as one Ray Tune search.

Variants (a ``grid_search``, run in parallel): ``scratch`` (target only, random init),
``source_only`` (the source model, head remapped, evaluated without training), and
``finetune_none|encoder|middle|decoder``. Each trial is an MLflow child run of one parent run;
the parent gets ``transfer_table.md`` and ``transfer_table.csv`` (lesion-wise Dice and HD95 per
region and their means, winner = best mean lesion-wise Dice), also printed.

    python jobs/transfer_study.py --smoke-test
    python jobs/transfer_study.py --source models:/bratstune-gli@champion --target-data data/SSA \
        --target-challenge SSA --epochs 10 --steps-per-epoch 25
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

import _bootstrap
from bratstune import paths
from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
from bratstune.data.synthetic import generate_cohort
from bratstune.errors import ConfigError
from bratstune.labels import scheme_for
from bratstune.training.fit import fit
from bratstune.transfer import evaluate_source, finetune, finetune_config, load_source, prepare_target

logger = logging.getLogger("transfer_study")

FREEZE_VARIANTS = {"none": [], "encoder": ["encoder"], "middle": ["middle"], "decoder": ["decoder"]}
VARIANTS = ["scratch", "source_only", *(f"finetune_{k}" for k in FREEZE_VARIANTS)]
WINNER_METRIC = "val/dice_lesion_mean"

SMOKE_CONFIG = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
    "data": {"patch_size": [24, 24, 24], "batch_size": 2, "num_workers": 0},
    "optim": {"lr": 1.0e-2},
    "epochs": 1,
    "steps_per_epoch": 4,
    "num_threads": 1,
    "seed": 0,
}


def parse_fill(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not value:
            raise ConfigError(f"--fill {item!r}: expected MODALITY=SOURCE, e.g. t1n=t1c or t1n=zeros")
        out[key.strip()] = value.strip()
    return out


def run_variant(config: Mapping[str, Any]) -> dict[str, float]:
    """One variant (also the Ray Tune function trainable's body). Returns its ``val/`` metrics."""
    variant = config["variant"]
    source = load_source(config["source"], config.get("scheme_hint"), member=int(config.get("member", 0)))
    data, challenge = prepare_target(
        config["target_data"],
        source,
        fill=config.get("fill") or None,
        val_fraction=float(config["val_fraction"]),
        seed=int(config.get("seed", 0)),
        cache_root=Path(config["cache_root"]) if config.get("cache_root") else None,
        filled_dir=Path(config["out_dir"]) / "filled",
    )
    challenge = config.get("challenge") or challenge
    overrides = dict(config.get("overrides") or {})
    out = Path(config["out_dir"]) / variant
    if variant == "source_only":
        return evaluate_source(source, data, challenge=challenge, config_overrides=overrides)
    if variant == "scratch":
        train_config = finetune_config(source, overrides, freeze=(), init_file=None, challenge=challenge)
        result = fit(train_config, data, out_dir=out)
    else:
        freeze = FREEZE_VARIANTS[variant.removeprefix("finetune_")]
        result = finetune(source, data, overrides, freeze=freeze, out_dir=out, challenge=challenge)
    return {k: float(v) for k, v in result.best_metrics.items() if k.startswith("val/")}


def _trainable(config: dict[str, Any]) -> None:
    # Deferred: ray must be imported after _bootstrap keeps it on loopback (isort puts third-party first).
    from ray import tune  # noqa: PLC0415

    status = "FAILED"
    run = mlflow.start_run(
        run_name=config["variant"],
        experiment_id=config["experiment_id"],
        parent_run_id=config["parent_run_id"],
        tags={"ray_trial_id": tune.get_context().get_trial_id(), "variant": config["variant"]},
    )
    try:
        mlflow.log_params({"variant": config["variant"], "source": config["source"]})
        metrics = run_variant(config)
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in finite.items()})
        transfer = Path(config["out_dir"]) / config["variant"] / "transfer.json"
        if transfer.is_file():
            mlflow.log_artifact(str(transfer))
        status = "FINISHED"
        tune.report({**finite, "variant": config["variant"]})
    except SystemExit:
        status = "FINISHED"
        raise
    finally:
        mlflow.end_run(status=status)
        del run


def study_table(rows: Mapping[str, Mapping[str, float]], regions: Sequence[str]) -> tuple[str, str, str | None]:
    """``(markdown, csv, winner)`` of lesion-wise Dice/HD95 per region and means."""
    columns = [
        *(f"dice_lesion_{r}" for r in regions),
        "dice_lesion_mean",
        *(f"hd95_lesion_{r}" for r in regions),
        "hd95_lesion_mean",
    ]
    scored = {v: m.get(WINNER_METRIC, float("nan")) for v, m in rows.items()}
    finite = {v: s for v, s in scored.items() if math.isfinite(s)}
    winner = max(finite, key=finite.get) if finite else None

    def cell(value: Any) -> str:
        return "" if value is None or not math.isfinite(value) else f"{value:.4f}"

    header = ["variant", *columns, "winner"]
    body = [[v, *(cell(m.get(f"val/{c}")) for c in columns), "*" if v == winner else ""] for v, m in rows.items()]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join([f"**{r[0]}**" if r[-1] else r[0], *r[1:]]) + " |" for r in body]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(body)
    return "\n".join(md) + "\n", buffer.getvalue(), winner


def smoke_inputs(work: Path) -> tuple[str, str]:
    """A seeded GLI unet (trained 1 epoch on 4 procedural GLI cases) and a 6-case SSA cohort."""
    generate_cohort(work / "gli", challenge="GLI", cases=4, shape=(32, 32, 32), anatomy="procedural", seed=0, workers=1)
    generate_cohort(work / "ssa", challenge="SSA", cases=6, shape=(32, 32, 32), anatomy="procedural", seed=1, workers=1)
    prepared = prepare_cohort(work / "gli", preprocess_config(None), cache_root=work / "cache")
    data = split_train_val(prepared.cases, prepared.scheme, val_fraction=0.0)
    fit({**SMOKE_CONFIG, "challenge": "GLI"}, data, out_dir=work / "source")
    return str(work / "source"), str(work / "ssa")


def study_inputs(args: argparse.Namespace, work: Path) -> tuple[str, str, dict[str, Any]]:
    """``(source, target, config overrides)`` of the flags (``--smoke-test``: :func:`smoke_inputs`).

    Raises:
        ConfigError: no ``--source`` / ``--target-data`` and no ``--smoke-test``.
    """
    source, target = args.source, args.target_data
    overrides = json.loads(args.overrides) if args.overrides else {}
    if args.smoke_test:
        source, target = smoke_inputs(work)
        overrides = {**{k: v for k, v in SMOKE_CONFIG.items() if k not in ("model",)}, **overrides}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.steps_per_epoch:
        overrides["steps_per_epoch"] = args.steps_per_epoch
    if not source or not target:
        raise ConfigError("--source and --target-data are required (or --smoke-test)")
    if Path(str(source)).expanduser().exists():  # trials run in their own working directories
        source = str(Path(str(source)).expanduser().resolve())
    return str(source), str(target), overrides


def _start_parent(client: MlflowClient, experiment_id: str, title: str, base: dict[str, Any], target: str) -> str:
    tags = {"bratstune.kind": "transfer", "source": base["source"], "target": target}
    parent_id = client.create_run(experiment_id, run_name=title, tags=tags).info.run_id
    for key, value in base.items():
        if key not in ("parent_run_id", "experiment_id", "overrides", "fill"):
            client.log_param(parent_id, key, value)
    client.log_param(parent_id, "overrides", json.dumps(base["overrides"]))
    return parent_id


def _run_grid(
    base: dict[str, Any], variants: Sequence[str], *, title: str, cpus: int, work: Path
) -> dict[str, dict[str, float]]:
    """The variants as one Ray Tune grid (Ray must be initialised); ``{variant: val/ metrics}``."""
    # Deferred: ray must be imported after _bootstrap keeps it on loopback (isort puts third-party first).
    from ray import tune  # noqa: PLC0415

    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": 1}),
        param_space={**base, "variant": tune.grid_search(list(variants))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cpus),
        run_config=tune.RunConfig(
            name=title,
            storage_path=str(work / "ray"),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    rows: dict[str, dict[str, float]] = {}
    for result in tuner.fit():
        variant = result.config["variant"]
        if result.error is not None:
            logger.error("variant %s failed: %s", variant, result.error)
            rows[variant] = {}
        else:
            metrics = result.metrics or {}
            rows[variant] = {k: v for k, v in metrics.items() if isinstance(k, str) and k.startswith("val/")}
    return {v: rows.get(v, {}) for v in variants}


def _finish_parent(
    client: MlflowClient, parent_id: str, rows: Mapping[str, Mapping[str, float]], target: str | None
) -> str | None:
    """The study table on the parent run (and printed); returns the winner."""
    regions = scheme_for(target or "GLI").regions if target else ("WT", "TC", "ET")
    regions = [r for r in regions if any(f"val/dice_lesion_{r}" in m for m in rows.values())] or list(regions)
    markdown, table_csv, winner = study_table(rows, regions)
    client.log_text(parent_id, markdown, "transfer_table.md")
    client.log_text(parent_id, table_csv, "transfer_table.csv")
    if winner is not None:
        client.set_tag(parent_id, "winner", winner)
        client.log_metric(parent_id, "winner_dice_lesion_mean", rows[winner][WINNER_METRIC])
    client.set_terminated(parent_id, "FINISHED")
    print(markdown)
    return winner


def default_out(title: str) -> Path:
    """``<BRATSTUNE_HOME>/results/<title>-<YYYYmmdd-HHMMSS>``: a study's work folder when ``--out`` is not given."""
    return paths.results_dir() / f"{title}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_variants(args: argparse.Namespace, variants: Sequence[str], *, title: str) -> dict[str, dict[str, float]]:
    """Run ``variants`` as a Ray Tune grid with MLflow child runs; return ``{variant: metrics}``."""
    work = Path(args.out or default_out(title)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source, target, overrides = study_inputs(args, work)
    # Ray (a local one of --cpus CPUs, or $RAY_ADDRESS) and MLflow for the whole study.
    with _bootstrap.session(experiment=args.experiment, num_cpus=args.cpus, log_to_driver=False) as session:
        client = MlflowClient()
        base = {
            "source": source,
            "target_data": str(Path(target).resolve()),
            "challenge": args.target_challenge,
            "member": args.member,
            "fill": parse_fill(args.fill),
            "overrides": overrides,
            "val_fraction": args.val_fraction,
            "cache_root": str(work / "cache"),
            "out_dir": str(work),
            "experiment_id": session.experiment_id,
            "parent_run_id": None,
            "scheme_hint": args.scheme_hint,
            "seed": 0,
        }
        base["parent_run_id"] = parent_id = _start_parent(client, session.experiment_id, title, base, target)
        status = "FAILED"
        try:
            # prepare the target once in the driver (cache, modality check) so trials only read
            prepare_target(
                base["target_data"],
                load_source(source, args.scheme_hint, member=args.member),
                fill=base["fill"] or None,
                val_fraction=args.val_fraction,
                cache_root=work / "cache",
                filled_dir=work / "filled",
            )
            rows = _run_grid(base, variants, title=title, cpus=args.cpus, work=work)
            status = "FINISHED"
        finally:
            if status != "FINISHED":
                client.set_terminated(parent_id, status)
    winner = _finish_parent(client, parent_id, rows, args.target_challenge)
    print(f"winner: {winner}  (MLflow parent run {parent_id}, outputs {work})")
    return rows


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--source", help="models:/NAME@ALIAS, runs:/ID/ensemble, a fit output / best-model folder or run id")
    p.add_argument("--member", type=int, default=0, help="ensemble member to start from")
    p.add_argument("--scheme-hint", default=None, help="label scheme of a plain model folder (default from its config)")
    p.add_argument("--target-data", help="target cohort folder")
    p.add_argument("--target-challenge", default=None, help="GLI, SSA, PED ... (lesion-wise rules); default from names")
    p.add_argument("--fill", action="append", help="fill a missing modality: t1n=t1c or t1n=zeros (repeatable)")
    p.add_argument("--overrides", default=None, help="JSON of config overrides, e.g. '{\"optim.lr\": 3e-4}'")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs (= parallel trials)")
    p.add_argument("--experiment", default="bratstune-transfer")
    p.add_argument("--out", default=None, help="work folder (default .bratstune/results/<study>-<timestamp>)")
    p.add_argument("--smoke-test", action="store_true", help="tiny synthetic GLI -> SSA run")
    return p


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.smoke_test and not args.target_challenge:
        args.target_challenge = "SSA"
    run_variants(args, VARIANTS, title="transfer-study")
    return 0


if __name__ == "__main__":
    sys.exit(main())
