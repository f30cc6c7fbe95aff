"""`make demo`: synthetic cohort -> inspect -> train -> loss search -> CV ensemble -> champion -> batch prediction."""

from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap
from bratstune.demo import DemoConfig, run_demo


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=DemoConfig.cases, help="size of the synthetic GLI cohort")
    parser.add_argument("--anatomy", default=DemoConfig.anatomy, choices=["atlas", "procedural"])
    parser.add_argument("--trials", type=int, default=DemoConfig.search_trials, help="loss-search trials")
    parser.add_argument("--folds", type=int, default=DemoConfig.folds, help="cross-validation folds")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    config = DemoConfig(cases=args.cases, anatomy=args.anatomy, search_trials=args.trials, folds=args.folds)
    return run_demo(
        config, runtime_env=_bootstrap.runtime_env(), search_space=_bootstrap.ROOT / "search_spaces" / "losses.yaml"
    )


if __name__ == "__main__":
    sys.exit(main())
