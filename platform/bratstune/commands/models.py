"""`bratstune models list [--name NAME]`: registered ensembles, versions, aliases and metrics.

A version registered before package digests were recorded is marked: loading it is refused,
and the line says how to re-register it.
"""

from __future__ import annotations

import argparse
import math

import mlflow

from bratstune.ensemble.registry import list_models
from bratstune.integrity import REREGISTER_HINT
from bratstune.tracking.runs import tracking_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list"], help="what to do (list)")
    parser.add_argument("--name", help="only this registered model (e.g. bratstune-gli)")
    parser.add_argument(
        "--all-metrics", action="store_true", help="print every recorded metric, not only the selection metric"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def run(args: argparse.Namespace) -> int:
    mlflow.set_tracking_uri(tracking_uri())
    rows = list_models(args.name)
    if not rows:
        print(f"no registered models in {tracking_uri()}")
        return 0
    header = f"{'name':<24} {'version':>7}  {'aliases':<20} {'metric':<24} {'value':>8}  {'created':<16} run"
    print(header)
    print("-" * len(header))
    for row in rows:
        aliases = ",".join(row["aliases"]) or "-"
        if row["forced"]:
            aliases += " (forced)"
        print(
            f"{row['name']:<24} {row['version']:>7}  {aliases:<20} {str(row['metric'] or '-'):<24} "
            f"{_fmt(row['value']):>8}  {row['created']:<16} {row['run_id'] or '-'}"
        )
        if not row["verifiable"]:
            print(f"{'':<34}old package (no recorded digest): loading it is refused; {REREGISTER_HINT}")
        if args.all_metrics:
            for key, value in sorted(row["metrics"].items()):
                print(f"{'':<34}{key:<34} {_fmt(value)}")
    return 0
