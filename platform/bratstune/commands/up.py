"""``bratstune up``: start a local Ray head and MLflow server on 127.0.0.1 and record their addresses.

With ``$MLFLOW_TRACKING_URI`` set, that (shared) server is used and no MLflow server is started.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bratstune import paths
from bratstune.services.stack import UpOptions, up


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = UpOptions()
    parser.add_argument("--ray-port", type=int, default=defaults.ray_port, help="Ray GCS port (0 = any free)")
    parser.add_argument(
        "--dashboard-port", type=int, default=defaults.dashboard_port, help="Ray dashboard / job API port"
    )
    parser.add_argument(
        "--mlflow-port", type=int, default=defaults.mlflow_port, help="MLflow server port (0 = any free)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs the Ray head offers (default: all)")
    parser.add_argument(
        "--ray-temp-dir", type=Path, default=None, help="Ray temp dir (default a new /tmp/bratstune-ray-*)"
    )
    parser.add_argument(
        "--timeout", type=float, default=defaults.timeout, help="seconds each service may take to start"
    )


def run(args: argparse.Namespace) -> int:
    options = UpOptions(
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        mlflow_port=args.mlflow_port,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        ray_temp_dir=args.ray_temp_dir,
        timeout=args.timeout,
    )
    record = up(options)
    mlflow, ray = record["mlflow"], record["ray"]
    if mlflow.get("external"):
        print(f"mlflow  {mlflow['tracking_uri']}  (the shared server of $MLFLOW_TRACKING_URI; none started)")
    else:
        print(f"mlflow  {mlflow['tracking_uri']}  (pid {mlflow['pid']}, up in {mlflow['started_s']} s)")
    print(f"ray     {ray['address']}  dashboard {ray['dashboard']}  (pid {ray['pid']}, up in {ray['started_s']} s)")
    print(f"recorded in {paths.endpoints_file()}: jobs and commands started from here use both.")
    print("elsewhere (another folder, `ray job submit`):")
    print(f"  export MLFLOW_TRACKING_URI={mlflow['tracking_uri']} RAY_ADDRESS={ray['address']}")
    print(f"  export RAY_API_SERVER_ADDRESS={ray['dashboard']}")
    print("stop both with `bratstune down`.")
    return 0
