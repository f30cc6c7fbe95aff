"""`bratstune train --data DIR (--config FILE | --preset NAME) [--set k=v ...]`: train one model.

Steps: read the config (YAML file or bundled preset, then ``--set`` overrides), discover the
labelled cases under ``--data``, prepare them in the preprocessing cache, hold out
``--val-fraction`` of them (stratified by tumour volume; or take entry ``--fold`` of a
``--splits`` file, nnU-Net's ``splits_final.json`` shape, or validate on a separate
``--val-data`` cohort), record which cases train and which select the epoch (``cases.json``
in the output folder and on the run), and run :func:`bratstune.training.fit.fit`
inside an MLflow run (embedded SQLite store unless ``MLFLOW_TRACKING_URI`` is set) that records
the resolved config (params + ``config.yaml``), per-epoch metrics, the best model
(``best_model/``) and ``validation.png`` (reference vs predicted labels on validation slices).
Prints the validation Dice per region of the best epoch at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import mlflow

from bratstune import paths
from bratstune.config_utils import apply_overrides, load_yaml
from bratstune.data.cohort import TrainData, prepare_cohort, preprocess_config
from bratstune.data.fingerprint import data_fingerprint
from bratstune.data.splits import CASES_FILE, CaseRecord, train_val
from bratstune.errors import ConfigError
from bratstune.inference.outputs import decode_prediction
from bratstune.inference.sliding_window import predict_probabilities
from bratstune.presets import load_preset
from bratstune.search.reporter import MlflowReporter
from bratstune.tracking.artifacts import localise_config
from bratstune.tracking.outage import UNSENT_FILE
from bratstune.tracking.runs import experiment_link, log_cohort_input, setup_mlflow, start_run
from bratstune.training.config import load_train_config
from bratstune.training.fit import fit, inference_settings, resolve_config
from bratstune.training.validate import save_overlay_png


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="cohort folder with labelled cases")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="training config YAML (see bratstune.training.config)")
    source.add_argument("--preset", help="bundled preset name (`bratstune presets` lists them)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set loss.weights.dice=1.0 (repeatable)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.2, help="fraction of cases held out (default 0.2)")
    parser.add_argument("--splits", type=Path, help="nnU-Net splits_final.json: train and validate on entry --fold")
    parser.add_argument("--fold", type=int, default=0, help="the splits file's entry (default 0)")
    parser.add_argument("--val-data", type=Path, help="a separate labelled validation cohort (all of --data trains)")
    parser.add_argument("--out", type=Path, help="output folder (default .bratstune/results/train-<time>)")
    parser.add_argument("--experiment", default="bratstune-train", help="MLflow experiment name")
    parser.add_argument("--run-name", help="MLflow run name")
    parser.add_argument("--resume", type=Path, help="checkpoint folder of an earlier run to continue")
    parser.add_argument("--workers", type=int, default=1, help="processes preparing the cache (default 1)")


def _raw_config(args: argparse.Namespace) -> dict[str, Any]:

    if args.config is not None:
        raw = load_yaml(args.config)
    else:
        raw = load_preset(args.preset)
    return apply_overrides(raw, args.overrides)


def _summary_lines(result: Any, scheme: Any) -> list[str]:
    metrics = result.best_metrics
    regions = [r for r in scheme.regions if f"val/dice_{r}" in metrics]
    if not regions:
        return ["no validation metrics (no validation cases)"]
    lines = [f"validation Dice at the best epoch ({result.best_epoch}/{result.epochs_completed}):"]
    lines.append(
        "  "
        + "  ".join(f"{r} {metrics[f'val/dice_{r}']:.3f}" for r in regions)
        + f"  mean {metrics.get('val/dice_mean', float('nan')):.3f}"
    )
    if "val/dice_lesion_mean" in metrics:
        lesion = [r for r in scheme.regions if f"val/dice_lesion_{r}" in metrics]
        lines.append(
            "  lesion-wise: "
            + "  ".join(f"{r} {metrics[f'val/dice_lesion_{r}']:.3f}" for r in lesion)
            + f"  mean {metrics['val/dice_lesion_mean']:.3f}"
        )
    return lines


def _validation_png(result: Any, data: Any, out: Path, max_cases: int = 2) -> Path | None:

    if not data.val:
        return None
    settings = inference_settings(result.config)
    rows = []
    for case in list(data.val)[:max_cases]:
        pred = decode_prediction(predict_probabilities(result.model, case.image, settings), data.scheme, settings.mode)
        rows.append((case.case_id, case.image, case.label, pred))
    return save_overlay_png(out / "validation.png", rows, data.scheme)


def run(args: argparse.Namespace) -> int:

    if args.workers < 1:
        raise ConfigError(f"--workers: expected >= 1, got {args.workers}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        paths.output_folder(args.out)  # refused before the cohort is prepared
    config = resolve_config(load_train_config(_raw_config(args)))
    prepared = prepare_cohort(args.data, preprocess_config(config.data.preprocess), workers=args.workers)
    if config.challenge is None:
        config = dataclasses.replace(config, challenge=prepared.challenge or "GLI")
    val_cases = None
    if args.val_data is not None:  # the same preprocessing, so the validation cases match the training ones
        val_cases = prepare_cohort(
            args.val_data, prepared.preprocess or preprocess_config(config.data.preprocess)
        ).cases
    data: TrainData = train_val(
        prepared.cases,
        prepared.scheme,
        splits=args.splits,
        fold=args.fold,
        val_cases=val_cases,
        val_fraction=args.val_fraction,
        seed=config.seed,
    )
    cases = CaseRecord(trained=[c.case_id for c in data.train], selected=[c.case_id for c in data.val])
    out = paths.output_folder((args.out or paths.results_dir() / time.strftime("train-%Y%m%d-%H%M%S")).absolute())
    print(f"{len(data.train)} training / {len(data.val)} validation cases, scheme {prepared.scheme.name}, output {out}")

    # the cases and their preprocessing, and the training-label dust removal when it is on
    fingerprint = data_fingerprint(
        [c.case_id for c in prepared.cases], prepared.preprocess, label_dust=config.data.label_dust
    )
    experiment_id = setup_mlflow(args.experiment)
    tags = {
        "data.root": str(Path(args.data).absolute()),
        "data.scheme": prepared.scheme.name,
        "data.train_cases": len(data.train),
        "data.val_cases": len(data.val),
        "data.val_ids": ",".join(c.case_id for c in data.val)[:5000],
        "output": str(out),
    }
    with start_run(
        run_name=args.run_name or f"{config.model.name}-{time.strftime('%H%M%S')}",
        experiment_id=experiment_id,
        tags=tags,
        data_fingerprint=fingerprint,
        config=config,
    ) as run:
        log_cohort_input(
            run.info.run_id,
            name=Path(args.data).resolve().name,
            fingerprint=fingerprint,
            root=Path(args.data).resolve(),
            cases=len(data.train) + len(data.val),
            profile={"train_cases": len(data.train), "val_cases": len(data.val)},
        )
        mlflow.log_text(json.dumps(cases.to_json(), indent=1), CASES_FILE)  # what it trained and selected on
        cases.write(out / CASES_FILE)
        # The config logged above keeps its URIs; fit gets them as local folders.
        local, _ = localise_config(config.to_dict(), dst=out / "init")
        reporter = MlflowReporter(spool=out / UNSENT_FILE)  # what a dead tracking server misses waits there
        result = fit(load_train_config(local), data, reporter=reporter, out_dir=out, resume_from=args.resume)
        reporter.close()
        if result.best_dir is not None:
            mlflow.log_artifacts(str(result.best_dir), "best_model")
        png = _validation_png(result, data, out)
        if png is not None:
            mlflow.log_artifact(str(png))
        run_id = run.info.run_id
    for line in _summary_lines(result, prepared.scheme):
        print(line)
    print(f"best model: {result.best_dir or '-'}  last checkpoint: {result.last_checkpoint or '-'}")
    print(
        f"MLflow run {run_id} in experiment '{args.experiment}': {experiment_link(mlflow.get_tracking_uri(), experiment_id)}"
    )
    return 0
