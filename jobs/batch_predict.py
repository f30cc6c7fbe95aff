"""Batch prediction job: ``python jobs/batch_predict.py --cohort DIR --model models:/bratstune-gli@champion --out DIR``.

Same arguments as ``bratstune predict`` (``--workers N`` for N Ray actors, ``--watch INBOX
--interval S`` to poll, ``--address`` / ``RAY_ADDRESS`` for a cluster); exit code 1 when a case
failed (see ``failures.csv``), 2 on a usage error. Runs the same under
``ray job submit --working-dir . -- python jobs/batch_predict.py ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap
from bratstune.commands import predict


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    predict.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # N workers: Ray actors on the cluster (--address / $RAY_ADDRESS) or on a local Ray of N CPUs.
    with _bootstrap.session(ray=args.workers > 1, address=args.address, num_cpus=args.workers, log_to_driver=False):
        return predict.run(args)


if __name__ == "__main__":
    sys.exit(main())
