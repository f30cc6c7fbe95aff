"""Search region thresholds and post-processing for a finished model, without retraining.

    python jobs/search_thresholds.py --smoke-test                      # tiny model + 20 configurations
    python jobs/search_thresholds.py --model 3f2a9c...                 # an MLflow run (its best_model)
    python jobs/search_thresholds.py --model models:/brats-gli@champion --data /data/BraTS-GLI

Validation probabilities are computed once (sliding window); each Optuna trial then only
thresholds, post-processes and scores them (mean lesion-wise Dice by default), so hundreds of
configurations take minutes. The search runs in this process (no Ray trial overhead: a
configuration takes milliseconds to a second); ``--address`` is accepted for symmetry with the
other jobs and ignored. Results: one MLflow run (a child of the model's run when ``--model`` is
a run id) with the best thresholds (``best_postprocess.yaml``), per-trial metrics, table and plots.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import _bootstrap
from bratstune.errors import ConfigError
from bratstune.search.data import synthetic_cohort
from bratstune.search.threshold_job import run_threshold_search
from bratstune.search.threshold_space import load_threshold_space
from bratstune.tracking.runs import experiment_link

DEFAULT_SPACE = _bootstrap.ROOT / "search_spaces" / "thresholds.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="run id, runs:/ or models:/ URI, or a best/ folder")
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="kind: thresholds search space")
    parser.add_argument("--data", type=Path, default=None, help="cohort folder (default: synthetic GLI cohort)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU run (trains a 1-epoch model if no --model)")
    parser.add_argument("--num-samples", type=int, default=None, help="override the number of configurations")
    parser.add_argument("--device", default="cpu", help="device for the probability pass (cpu, cuda)")
    parser.add_argument("--experiment", default="bratstune-search", help="MLflow experiment name")
    parser.add_argument("--address", default=None, help="ignored (the search runs in this process)")
    return parser


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = load_threshold_space(args.space)
    if args.smoke_test:
        spec = spec.smoke_variant()
    if args.model is None and not args.smoke_test:
        raise ConfigError("--model is required (or --smoke-test to train a tiny one)")
    with _bootstrap.session(experiment=args.experiment, ray=False) as session:
        data = args.data or synthetic_cohort(
            cases=8 if args.smoke_test else 16, shape=(48, 48, 32) if args.smoke_test else (64, 64, 48)
        )
        outcome, run_id = run_threshold_search(
            spec,
            model=args.model,
            data=data,
            experiment_id=session.experiment_id,
            tracking_uri=session.tracking_uri,
            num_samples=args.num_samples,
            device=args.device,
        )
    print(f"{outcome.trials} configurations in {outcome.seconds:.1f} s ({outcome.per_minute:.0f}/min)")
    print(f"{spec.metric}: {outcome.best_metric:.4f} (default thresholds: {outcome.baseline_metric:.4f})")
    for key, value in outcome.best_values.items():
        print(f"  {key}: {value}")
    print(f"MLflow run {run_id}; compare: {experiment_link(session.tracking_uri, session.experiment_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
