"""``bratstune down``: stop the Ray head and MLflow server that ``bratstune up`` started, by PID."""

from __future__ import annotations

import argparse
import sys

from bratstune import paths
from bratstune.services.stack import down


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-logs", action="store_true", help="keep the Ray temp dir (logs) that `up` created")


def run(args: argparse.Namespace) -> int:
    left = down(keep_logs=args.keep_logs)
    if not left:
        print(f"nothing recorded in {paths.endpoints_file()}: nothing to stop")
        return 0
    for name, pids in left.items():
        print(f"{name:<7} {'stopped' if not pids else 'STILL ALIVE: pids ' + ' '.join(map(str, pids))}")
    if any(left.values()):
        print(f"kept {paths.endpoints_file()}: run `bratstune down` again or stop those PIDs", file=sys.stderr)
        return 1
    return 0
