"""Threshold configurations evaluated per minute on cached probabilities.

    python benchmarks/threshold_search.py                  # 16 synthetic cases at 64x64x48, 100 configurations
    python benchmarks/threshold_search.py --cases 8 --trials 300 --metric dice_mean

The probabilities stand in for a model's validation output: each region mask of the reference
is blurred and mixed with uniform noise, so components, holes and dust look like a real
network's. The timing covers what a trial does: decode, post-process, score every case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import _bootstrap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48))
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--metric", default="dice_lesion_mean")
    parser.add_argument("--space", type=Path, default=_bootstrap.ROOT / "search_spaces" / "thresholds.yaml")
    args = parser.parse_args(argv)

    import numpy as np
    from scipy import ndimage

    from bratstune.data.cohort import prepare_cohort, preprocess_config
    from bratstune.labels import labels_to_regions
    from bratstune.search.data import synthetic_cohort
    from bratstune.search.threshold_space import load_threshold_space
    from bratstune.search.thresholds import CachedCase, search_thresholds

    cohort = synthetic_cohort(cases=args.cases, shape=tuple(args.shape))
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
    spec = load_threshold_space(args.space)
    from dataclasses import replace

    spec = replace(spec, metric=args.metric, mode="min" if args.metric.startswith("hd95") else "max")
    outcome = search_thresholds(
        spec, cases, prepared.scheme, challenge=prepared.challenge or "GLI", num_samples=args.trials
    )
    voxels = int(np.prod(cases[0].label.shape))
    print(
        f"{outcome.trials} configurations x {len(cases)} cases (~{voxels} voxels each, cropped) "
        f"in {outcome.seconds:.1f} s: {outcome.per_minute:.0f} configurations/min, "
        f"{outcome.per_minute * len(cases):.0f} case evaluations/min"
    )
    print(f"{spec.metric}: default {outcome.baseline_metric:.4f} -> best {outcome.best_metric:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
