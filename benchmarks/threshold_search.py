"""Threshold configurations evaluated per minute on cached probabilities.

    python benchmarks/threshold_search.py                  # 10 atlas cases at 2 mm (the demo's), 100 configurations
    python benchmarks/threshold_search.py --workers 1 2    # one process, then two (the default)
    python benchmarks/threshold_search.py --cases 8 --trials 300 --metric dice_mean
    python benchmarks/threshold_search.py --anatomy procedural --shape 64 64 48
    python benchmarks/threshold_search.py --check 20       # also: 20 random configurations equal the plain path

The probabilities stand in for a model's validation output: each region mask of the reference
is blurred and mixed with uniform noise, so components, holes and dust look like a real
network's (thresholds below ~0.35 let the noise through: the slowest configurations). The timing
covers what a trial does: decode, post-process, score every case, and Optuna's sampling. Each
worker count runs the same search on fresh copies of the cases (nothing prepared in advance); the
load average is printed with each figure, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import _bootstrap  # noqa: E402


def _cases(args):
    import numpy as np
    from scipy import ndimage

    from bratstune.data.cohort import prepare_cohort, preprocess_config
    from bratstune.labels import labels_to_regions
    from bratstune.search.data import synthetic_cohort
    from bratstune.search.thresholds import CachedCase

    shape = tuple(args.shape) if args.shape else (None if args.anatomy == "atlas" else (64, 64, 48))
    cohort = synthetic_cohort(cases=args.cases, shape=shape, anatomy=args.anatomy)
    prepared = prepare_cohort(cohort, preprocess_config({}))
    rng = np.random.default_rng(0)
    cases = []
    for case in prepared.cases:
        regions = labels_to_regions(np.asarray(case.label), prepared.scheme).astype(np.float32)
        probs = np.stack([ndimage.gaussian_filter(r, 1.5) for r in regions]) * 0.8 + rng.uniform(0, 0.35, regions.shape)
        cases.append(
            CachedCase(
                case.case_id, np.clip(probs, 0, 1).astype(np.float16), np.asarray(case.label), tuple(case.spacing)
            )
        )
    return cases, prepared


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (the workers, once they are joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _check(cases, scheme, challenge: str, count: int) -> None:
    """``count`` random configurations: the fast path equals the plain path on every case."""
    import math

    import numpy as np

    from bratstune.inference.decode import DecodeSettings
    from bratstune.search.decode_cache import case_metrics, plain_case_metrics

    rng = np.random.default_rng(1)
    for i in range(count):
        values = {f"thresholds.{r}": float(rng.uniform(0.2, 0.8)) for r in scheme.train_regions}
        values.update({f"min_size.{r}": int(rng.integers(0, 20)) * 10 for r in scheme.regions})
        values["fill_holes"] = bool(rng.random() < 0.5)
        settings = DecodeSettings.from_values(values, scheme.train_regions)
        case = cases[i % len(cases)]
        fast = case_metrics(case, scheme, settings, challenge, True)
        plain = plain_case_metrics(case, scheme, settings, challenge, True)
        same = list(fast) == list(plain) and all(
            fast[k] == plain[k] or (math.isnan(fast[k]) and math.isnan(plain[k])) for k in plain
        )
        if not same:
            raise SystemExit(f"fast path differs from the plain path on {case.case_id} with {values}")
    print(f"check: {count} random configurations, fast path == plain path on every metric")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--anatomy", default="atlas", help="atlas (2-mm BraTS-like, the default) or procedural")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="procedural volume shape (atlas: 2-mm grid)")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--metric", default="dice_lesion_mean")
    parser.add_argument("--space", type=Path, default=_bootstrap.ROOT / "search_spaces" / "thresholds.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to time, in turn")
    parser.add_argument("--check", type=int, default=0, help="random configurations to check against the plain path")
    args = parser.parse_args(argv)

    import copy

    import numpy as np

    from bratstune.search.threshold_space import load_threshold_space
    from bratstune.search.thresholds import search_thresholds

    cases, prepared = _cases(args)
    challenge = prepared.challenge or "GLI"
    spec = load_threshold_space(args.space)
    spec = replace(spec, metric=args.metric, mode="min" if args.metric.startswith("hd95") else "max")
    voxels = int(np.prod(cases[0].label.shape))
    print(f"{len(cases)} cases (~{voxels} voxels each), {args.trials} configurations, metric {spec.metric}")
    for workers in args.workers:
        fresh = [copy.copy(c) for c in cases]
        for case in fresh:
            vars(case)["_prepared"] = {}  # nothing carried over from an earlier run
        load = os.getloadavg()[0]
        cpu, children = time.process_time(), _children_cpu()
        outcome = search_thresholds(
            spec, fresh, prepared.scheme, challenge=challenge, num_samples=args.trials, workers=workers
        )
        cpu, children = time.process_time() - cpu, _children_cpu() - children
        print(
            f"workers {workers}: {outcome.trials} configurations in {outcome.seconds:.1f} s: "
            f"{outcome.per_minute:.0f} configurations/min ({outcome.per_minute * len(cases):.0f} case evaluations/min); "
            f"CPU {cpu:.1f} s here + {children:.1f} s in workers; load average {load:.2f} -> {os.getloadavg()[0]:.2f}"
        )
        print(f"  {spec.metric}: default {outcome.baseline_metric:.4f} -> best {outcome.best_metric:.4f}")
    if args.check:
        _check(cases, prepared.scheme, challenge, args.check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
