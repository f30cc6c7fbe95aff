"""Batch prediction job: ``python jobs/batch_predict.py --cohort DIR --model models:/bratstune-gli@champion --out DIR``.

Same arguments as ``bratstune predict`` (``--workers N`` for N Ray actors, ``--watch INBOX
--interval S`` to poll, ``--address`` / ``RAY_ADDRESS`` for a cluster); exit code 1 when a case
failed (see ``failures.csv``), 2 on a usage error. Runs the same under
``ray job submit --working-dir . -- python jobs/batch_predict.py ...``.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (puts platform/ on sys.path, keeps Ray on loopback)

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from bratstune.commands import predict
    from bratstune.errors import BratstuneError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    predict.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.workers > 1 and not args.address:
        import os

        import ray

        if not os.environ.get("RAY_ADDRESS"):
            ray.init(num_cpus=args.workers, include_dashboard=False, runtime_env=_bootstrap.runtime_env(),
                     log_to_driver=False)
    try:
        return predict.run(args)
    except BratstuneError as exc:
        print(f"batch_predict: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
