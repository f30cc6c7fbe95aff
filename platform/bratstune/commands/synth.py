"""`bratstune synth`: write a deterministic synthetic BraTS-like cohort."""

from __future__ import annotations

import argparse
import time

from bratstune.data.synthetic import generate_cohort

# Same values as bratstune.data.synthetic (checked by a test); repeated here so that building
# the CLI parser does not import numpy/scipy.
CHALLENGES = ("GLI", "SSA", "MEN", "MET", "PED")
ANATOMIES = ("atlas", "procedural")
NAMINGS = ("2023", "2021")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--challenge", default="GLI", choices=CHALLENGES, help="tumour type (default GLI)")
    parser.add_argument("--cases", type=int, default=40, help="number of cases (default 40)")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per case)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="output grid, a resample of the 240x240x155 BraTS field of view "
        "(default 120 120 78 = 2 mm; 240 240 155 = native 1 mm)",
    )
    parser.add_argument(
        "--naming",
        default="2023",
        choices=NAMINGS,
        help="2023: BraTS-GLI-00000-000-t1n.nii.gz; 2021: BraTS2021_00000_t1.nii.gz, legacy labels",
    )
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument(
        "--anatomy",
        default="atlas",
        choices=ANATOMIES,
        help="atlas: SRI24 atlas (needs `make venv`); procedural: fast phantom",
    )
    parser.add_argument("--start-index", type=int, default=0, help="index of the first case (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default 2 when cases >= 4)")


def run(args: argparse.Namespace) -> int:

    start = time.perf_counter()
    ids = generate_cohort(
        args.out,
        challenge=args.challenge,
        cases=args.cases,
        shape=tuple(args.shape) if args.shape else None,
        naming=args.naming,
        seed=args.seed,
        anatomy=args.anatomy,
        start_index=args.start_index,
        workers=args.workers,
    )
    took = time.perf_counter() - start
    span = f"{ids[0]} .. {ids[-1]}" if ids else "nothing"
    print(f"wrote {len(ids)} {args.challenge} cases ({span}) to {args.out} in {took:.1f} s")
    return 0
