"""Cross-validate one config in k folds (Ray Tune), tune thresholds on OOF, package the ensemble.

    python jobs/cross_validate.py --smoke-test                          # tiny CPU run, local Ray
    python jobs/cross_validate.py --data /data/BraTS-GLI --from-search 3f2a... --folds 5
    python jobs/cross_validate.py --data DIR --preset unet --epochs 30 --register bratstune-gli --promote
    python jobs/cross_validate.py --data DIR --preset unet --splits splits_final.json --gate-cases gate.json
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/cross_validate.py ...

The config is a search's best (``--from-search RUN_ID``: the parent run's ``best_config.yaml``),
a YAML file (``--config``) or a preset (``--preset``), with ``--set key=value`` overrides. Under
``ray job submit`` it joins the cluster (``RAY_ADDRESS``); run directly it starts a local Ray.
Output under ``--storage-path`` (default ``.bratstune/results/cv``): fold models, OOF
probabilities, tuned thresholds, case records and ``ensemble/``. MLflow goes to
``$MLFLOW_TRACKING_URI`` or ``.bratstune/mlflow.db``.

``--gate-fraction`` of the cohort (default 0.2) is kept out of the CV for the promotion gate;
each fold chooses its epoch on ``--inner-val-fraction`` of its own training cases
(``--selection inner``) or trains ``--epochs`` and keeps the last weights (``--selection fixed``).
The reported estimate is cross-fitted (``cv/oos/*``); the in-sample figure is printed beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import _bootstrap
from bratstune.errors import ConfigError
from bratstune.search import crossval
from bratstune.search.data import synthetic_cohort
from bratstune.tracking.runs import experiment_link


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="labelled cohort folder (default with --smoke-test: a tiny synthetic GLI cohort)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="training config YAML")
    source.add_argument("--preset", help="bundled preset name (bratstune presets)")
    source.add_argument("--from-search", metavar="RUN_ID", help="MLflow parent run of a search (its best_config.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set steps_per_epoch=20 (repeatable)",
    )
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    parser.add_argument("--splits", type=Path, default=None, help="nnU-Net splits_final.json: entry i is fold i")
    parser.add_argument(
        "--selection",
        choices=["inner", "fixed"],
        default="inner",
        help="each fold's epoch: chosen on an inner split of its training cases, or the last of --epochs",
    )
    parser.add_argument("--inner-val-fraction", type=float, default=0.2, help="inner validation share (default 0.2)")
    parser.add_argument("--gate-fraction", type=float, default=0.2, help="cases kept out for the promotion gate")
    parser.add_argument("--gate-cases", type=Path, default=None, help="JSON list of the gate case ids instead")
    parser.add_argument("--gate-data", type=Path, default=None, help="a separate labelled folder as the gate split")
    parser.add_argument("--gate-margin", type=float, default=0.0, help="how much the candidate must win by")
    parser.add_argument(
        "--gate-rule",
        choices=["lower_bound", "mean"],
        default="lower_bound",
        help="promote when the interval's lower end (default) or the mean difference exceeds the margin",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--threshold-trials", type=int, default=100, help="threshold/post-processing search trials")
    parser.add_argument("--cpus-per-fold", type=float, default=1.0, help="Tune CPUs per fold trial")
    parser.add_argument("--gpus-per-fold", type=float, default=0.0, help="Tune GPUs per fold trial")
    parser.add_argument("--register", metavar="NAME", default=None, help="register the ensemble as model NAME")
    parser.add_argument("--promote", action="store_true", help="with --register: move @champion if it wins")
    parser.add_argument("--force", action="store_true", help="with --register: move @champion regardless (logged)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU-only CV (seconds per fold)")
    parser.add_argument("--name", default=None, help="output / Tune experiment name (default cv-<timestamp>)")
    parser.add_argument("--storage-path", default=None, help="parent folder of the output (shared by all nodes)")
    parser.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    parser.add_argument("--experiment", default="bratstune-cv", help="MLflow experiment name")
    parser.add_argument("--workers", type=int, default=1, help="processes preprocessing the cohort")
    return parser


def spec_from_flags(args: argparse.Namespace) -> crossval.CrossValSpec:
    """The :class:`~bratstune.search.crossval.CrossValSpec` of the flags (``--smoke-test``: 3 folds, 10 trials)."""
    smoke = args.smoke_test
    mapping = {
        "folds": args.folds if not smoke or args.folds != 5 else 3,
        "seed": args.seed,
        "splits": args.splits,
        "selection": args.selection,
        "inner_val_fraction": args.inner_val_fraction,
        "gate_fraction": args.gate_fraction,
        "gate_cases": args.gate_cases,
        "gate_data": args.gate_data,
        "gate": {"margin": args.gate_margin, "rule": args.gate_rule},
        "epochs": args.epochs,
        "threshold_trials": 10 if smoke else args.threshold_trials,
        "resources": {"cpu": args.cpus_per_fold, "gpu": args.gpus_per_fold},
        "smoke": smoke,
        "name": args.name,
        "storage_path": args.storage_path,
        "register": args.register,
        "promote": args.promote,
        "force": args.force,
        "experiment": args.experiment,
        "workers": args.workers,
        "search_run_id": args.from_search,
    }
    return crossval.CrossValSpec.from_mapping(mapping, where="jobs/cross_validate.py flags")


def report(outcome: crossval.CVOutcome) -> None:
    """Print the folds, the pooled scores, the deployed decode, the ensemble and the registry."""
    metric = outcome.metric.rsplit("/", 1)[1]
    print(
        f"cross-validation: {len(outcome.fold_metrics)} folds, {len(outcome.gate)} gate case(s) kept out, "
        f"MLflow parent run {outcome.parent_run_id}"
    )
    for i, (fold, oos) in enumerate(zip(outcome.fold_metrics, outcome.fold_oos_metrics)):
        print(
            f"  fold {i}: {metric} {fold.get(metric, float('nan')):.4f} default decode, "
            f"{oos.get(metric, float('nan')):.4f} cross-fitted"
        )
    print(
        f"{metric}: {outcome.oos_metrics.get(metric, float('nan')):.4f} out-of-sample (cross-fitted: the estimate); "
        f"{outcome.oof_metrics_default.get(metric, float('nan')):.4f} default decode; "
        f"{outcome.in_sample_metrics.get(metric, float('nan')):.4f} in-sample (tuned on the same cases)"
    )
    print(f"thresholds {outcome.thresholds}, post-processing {outcome.postprocess}")
    print(f"ensemble: {outcome.ensemble.describe()} -> {outcome.ensemble_dir}")
    if outcome.registered:
        print(f"registered {outcome.registered}")
    if outcome.promotion is not None:
        p = outcome.promotion
        print(f"{'PROMOTED' if p.promoted else 'champion unchanged'}: {p.reason}")
    print(f"browse the runs: {experiment_link(outcome.tracking_uri, outcome.experiment_id)}")


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.smoke_test and not (args.config or args.preset or args.from_search):
        args.preset = "unet"
    config = crossval.resolve_config(
        config=args.config, preset=args.preset, from_search=args.from_search, overrides=args.overrides
    )
    spec = spec_from_flags(args)
    data = args.data
    if data is None:
        if not args.smoke_test:
            raise ConfigError("--data: give the labelled cohort folder (or use --smoke-test)")
        data = synthetic_cohort(cases=max(9, 3 * args.folds), shape=(40, 40, 32))
    with _bootstrap.session(experiment=spec.experiment, address=args.address, num_cpus=args.num_cpus) as session:
        outcome = crossval.cross_validate(config, data, spec, experiment_id=session.experiment_id)
    report(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
