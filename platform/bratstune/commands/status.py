"""``bratstune status``: what ``bratstune up`` started, where it listens and whether it answers."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from bratstune import paths
from bratstune.services.stack import read_record, status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the services as JSON")


def run(args: argparse.Namespace) -> int:
    record = read_record()
    states = status(record)
    healthy = bool(states) and all(s.healthy for s in states)
    if args.json:
        print(
            json.dumps(
                {"endpoints_file": str(paths.endpoints_file()), "services": [asdict(s) for s in states]}, indent=2
            )
        )
        return 0 if healthy else 1
    if not states:
        print(f"nothing started: no {paths.endpoints_file()} (start with `bratstune up`)")
        return 1
    for s in states:
        state = "healthy" if s.healthy else ("running, not answering" if s.alive else "stopped")
        print(f"{s.name:<7} {state:<23} {s.address:<24} pid {s.pid:<8} {s.detail}")
    served = paths.endpoints()
    if served:
        print("in use here: " + " ".join(f"{k}={v}" for k, v in served.items()))
    return 0 if healthy else 1
