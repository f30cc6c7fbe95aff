"""`make demo`: synthetic cohort -> inspect -> train (and, as the platform grows, the rest)."""
from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap  # noqa: F401  (puts platform/ on sys.path when the package is not installed)


def main(argv: list[str] | None = None) -> int:
    from bratstune.demo import DemoConfig, run_demo

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=DemoConfig.cases)
    parser.add_argument("--epochs", type=int, default=DemoConfig.train_epochs)
    parser.add_argument("--steps", type=int, default=DemoConfig.train_steps)
    parser.add_argument("--anatomy", default=DemoConfig.anatomy, choices=["atlas", "procedural"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return run_demo(DemoConfig(cases=args.cases, train_epochs=args.epochs, train_steps=args.steps, anatomy=args.anatomy))


if __name__ == "__main__":
    sys.exit(main())
