"""Package trained models as an ensemble, register it in MLflow and promote it if it wins.

``python jobs/promote_ensemble.py --members RUN_ID_OR_DIR ... --metric val/dice_mean [--name bratstune-gli] [--force]``

Same arguments as ``bratstune promote``; ``--smoke-test`` trains two tiny members on a synthetic
cohort first. The champion moves only when the new ensemble beats it on the same held-out gate
cases (paired per-case difference in ``--gate-metric``, bootstrap 95 % interval, ``--gate-margin``);
``--force`` moves it regardless and is recorded as forced. Cross-validation registers and gates
its own ensembles (``jobs/cross_validate.py --register NAME --promote``).
"""

from __future__ import annotations

import argparse
import logging
import sys

import _bootstrap
from bratstune.commands import promote


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    promote.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    return promote.run(args)  # MLflow set-up is the command's (bratstune promote)


if __name__ == "__main__":
    sys.exit(main())
