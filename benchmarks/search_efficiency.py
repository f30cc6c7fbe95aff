"""ASHA + TPE versus random search without early stopping, same task, same trial budget.

    python benchmarks/search_efficiency.py                # 8 trials x up to 4 epochs each, local Ray
    python benchmarks/search_efficiency.py --trials 16 --epochs 6

Both runs search ``search_spaces/losses.yaml`` (its smoke-sized network) on the same synthetic GLI
cohort with the same seed; prints, for each, the best validation score and the total number of
trial-epochs trained (the cost ASHA saves by stopping weak trials early).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import _bootstrap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=_bootstrap.ROOT / "search_spaces" / "losses.yaml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="optimisation steps per epoch")
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--address", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from bratstune import paths
    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.params import deep_merge
    from bratstune.search.space import load_search_space, parse_spec
    from bratstune.search.tune import run_search

    smoke = load_search_space(args.space).smoke_variant()
    raw = deep_merge(
        smoke.raw,
        {
            "num_samples": args.trials,
            "scheduler": {"max_t": args.epochs, "grace_period": 1, "reduction_factor": 2},
            "base": {"epochs": args.epochs, "steps_per_epoch": args.steps},
        },
    )
    raw["base"] = deep_merge(smoke.base, raw["base"])
    spec = parse_spec(raw, source=smoke.source)
    rows = []
    with _bootstrap.session(
        experiment="bratstune-benchmarks", address=args.address, num_cpus=args.num_cpus, log_to_driver=False
    ) as session:
        data = prepare_data(spec, synthetic_cohort(cases=args.cases, shape=(48, 48, 32)))
        for label, algorithm, scheduler in (
            ("ASHA + TPE", "tpe", "asha"),
            ("random, no early stopping", "random", "fifo"),
        ):
            start = time.perf_counter()
            outcome = run_search(
                spec,
                data,
                storage_path=paths.results_dir() / "benchmarks",
                name=f"efficiency-{algorithm}-{scheduler}-{time.strftime('%H%M%S')}",
                experiment_id=session.experiment_id,
                algorithm=algorithm,
                scheduler=scheduler,
                verbose=0,
            )
            epochs = sum(int(r["epochs"] or 0) for r in outcome.table)
            rows.append((label, outcome.best_metric, epochs, len(outcome.table), time.perf_counter() - start))
    print(
        f"\n{spec.metric}, {args.trials} trials of at most {args.epochs} epochs x {args.steps} steps "
        f"({args.cases} synthetic cases, seed {spec.search.seed})"
    )
    print(f"{'search':<28}{'best':>10}{'trial-epochs':>14}{'trials':>8}{'wall s':>9}")
    for label, best, epochs, trials, wall in rows:
        print(f"{label:<28}{best if best is not None else float('nan'):>10.4f}{epochs:>14d}{trials:>8d}{wall:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
