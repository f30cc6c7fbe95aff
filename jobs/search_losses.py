"""Search the compound-loss weights (``search_spaces/losses.yaml``) with Ray Tune + Optuna + ASHA.

    python jobs/search_losses.py --smoke-test                     # tiny CPU search, local Ray
    python jobs/search_losses.py --space search_spaces/losses.yaml --data /data/BraTS-GLI
    python jobs/search_losses.py --resume --name losses-20250101-120000
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/search_losses.py

Under ``ray job submit`` it joins the cluster (``RAY_ADDRESS``); run directly it starts a local
Ray. Without ``--data`` it generates the synthetic GLI cohort into ``bratstune.paths.data_dir()``.
Results persist under ``--storage-path`` (default ``.bratstune/results/search``); MLflow goes to
``$MLFLOW_TRACKING_URI`` or ``.bratstune/mlflow.db``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import _bootstrap
from bratstune.search.data import job_cohort, prepare_data
from bratstune.search.space import load_search_space
from bratstune.search.tune import run_search

DEFAULT_SPACE = _bootstrap.ROOT / "search_spaces" / "losses.yaml"


def build_parser(default_space: Path = DEFAULT_SPACE, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=default_space, help="search-space YAML")
    parser.add_argument("--data", type=Path, default=None, help="cohort folder (default: synthetic GLI cohort)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU-only search (the space's smoke profile)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    parser.add_argument(
        "--name", default=None, help="experiment name (default <space>-<timestamp>; with --resume the latest)"
    )
    parser.add_argument("--storage-path", default=None, help="Tune storage: folder, shared path or URI")
    parser.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    parser.add_argument("--num-samples", type=int, default=None, help="override the number of trials")
    parser.add_argument("--experiment", default="bratstune-search", help="MLflow experiment name")
    parser.add_argument("--synthetic-cases", type=int, default=None, help="size of the generated cohort")
    parser.add_argument("--workers", type=int, default=1, help="processes preprocessing the cohort")
    parser.add_argument("--splits", type=Path, default=None, help="nnU-Net splits_final.json: use entry --fold")
    parser.add_argument("--fold", type=int, default=0, help="the splits file's entry (default 0)")
    parser.add_argument("--val-data", type=Path, default=None, help="a separate labelled validation cohort")
    return parser


@_bootstrap.error_tail
def main(argv: list[str] | None = None, *, default_space: Path = DEFAULT_SPACE, description: str | None = None) -> int:
    args = build_parser(default_space, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = load_search_space(args.space)
    if args.smoke_test:
        spec = spec.smoke_variant()
    if args.num_samples:
        spec = spec.with_changes(num_samples=args.num_samples)
    with _bootstrap.session(experiment=args.experiment, address=args.address, num_cpus=args.num_cpus) as session:
        data = job_cohort(args.data, smoke=args.smoke_test, cases=args.synthetic_cases)
        handle = prepare_data(
            spec, data, workers=args.workers, splits=args.splits, fold=args.fold, val_root=args.val_data
        )
        outcome = run_search(
            spec,
            handle,
            storage_path=args.storage_path,
            name=args.name,
            resume=args.resume,
            experiment_id=session.experiment_id,
        )
    print(f"search {outcome.name}: {len(outcome.table)} trials, {outcome.errors} errored; results in {outcome.path}")
    if outcome.best_config is not None:
        print(f"best {spec.metric} = {outcome.best_metric:.4f} (MLflow run {outcome.best_run_id})")
        for key, value in outcome.best_values.items():
            print(f"  {key}: {value}")
    print(f"compare the trials: {outcome.ui_command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
