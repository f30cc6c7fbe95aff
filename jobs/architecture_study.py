"""Architecture study: unet, resunet, attention_unet, unetr, segresnet, transunet_enc (scratch and
MAE-initialised) and transunet_dec on one cohort and one budget, as a Ray Tune grid with MLflow children.

    python jobs/architecture_study.py --smoke-test                  # tiny CPU grid, prints the table
    python jobs/architecture_study.py --data /data/BraTS-GLI --epochs 20 --steps 50 \\
        --mae-encoder models:/bratstune-mae-encoder@latest
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/architecture_study.py --smoke-test

Writes ``study.md`` and ``study.csv`` (lesion-wise Dice / HD95 / recall at each arm's best epoch,
seconds per training step, parameters) under ``--out`` and on the study's parent run. The
MAE-initialised arm needs ``--mae-encoder`` (an encoder whose ViT matches ``--vit``); with
``--smoke-test`` an untrained encoder of the smoke ViT exercises its loading path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import _bootstrap
from bratstune import paths
from bratstune.errors import ConfigError
from bratstune.search.data import job_cohort
from bratstune.search.study import ARMS, StudySpec, run_study, untrained_mae_encoder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="cohort folder (default: synthetic GLI cohort)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU grid (2 epochs x 2 steps, 32^3)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="arms to run (default all)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every arm")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch of every arm")
    parser.add_argument(
        "--val-cases", default=None, help="validation cases scored per epoch: a number, or 'all' (held-out cases)"
    )
    parser.add_argument(
        "--mae-encoder", default=None, help="MAE encoder for transunet_enc_mae (models:/, runs:/, path)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/architecture_study)")
    parser.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    parser.add_argument("--experiment", default="bratstune-study", help="MLflow experiment name")
    parser.add_argument("--synthetic-cases", type=int, default=None, help="size of the generated cohort")
    return parser


def _val_cases(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--val-cases {text!r}: expected a positive number or 'all'")
    return int(text)


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    study = StudySpec.smoke() if args.smoke_test else StudySpec()
    changes = {"arms": tuple(args.arms) if args.arms else None, "epochs": args.epochs, "steps_per_epoch": args.steps}
    study = replace(study, **{k: v for k, v in changes.items() if v is not None})
    if args.val_cases is not None:
        study = replace(study, val_cases=_val_cases(args.val_cases))
    out = (args.out or paths.results_dir() / "architecture_study").resolve()
    mae = args.mae_encoder
    if mae is None and args.smoke_test:
        mae = str(untrained_mae_encoder(study, out / "smoke-mae-encoder"))
    with _bootstrap.session(experiment=args.experiment, address=args.address, num_cpus=args.num_cpus) as session:
        data = job_cohort(args.data, smoke=args.smoke_test, cases=args.synthetic_cases, smoke_cases=6)
        outcome = run_study(
            study,
            data,
            tracking_uri=session.tracking_uri,
            experiment_id=session.experiment_id,
            output_dir=out,
            mae_encoder=mae,
        )
    print(outcome.markdown)
    print(f"table: {outcome.markdown_path} and {outcome.csv_path}; MLflow parent run {outcome.parent_run_id}")
    return 0 if all(row["status"] == "ok" for row in outcome.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
