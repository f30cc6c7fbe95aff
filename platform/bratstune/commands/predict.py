"""`bratstune predict --cohort DIR --model URI --out DIR`: batch prediction (also `--watch DIR`).

Predicts every new or changed case of the cohort with a packaged ensemble (default
``models:/bratstune-gli@champion``) and writes ``<case-id>-seg.nii.gz`` (input geometry),
``predictions.csv``, ``failures.csv``, ``report.html`` and an MLflow run; see
:mod:`bratstune.predict.batch`. ``--workers 1`` runs in this process without Ray; ``--workers N``
uses N Ray actors (local Ray started here, or ``--address`` / ``RAY_ADDRESS``).
``--watch DIR --interval S`` polls an inbox instead. Exit code: 0 when every case is predicted,
1 when a case failed (see failures.csv), 2 on a usage error. ``jobs/batch_predict.py`` is this
command as a job.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import bratstune
from bratstune import paths
from bratstune.errors import ConfigError
from bratstune.predict.batch import BatchSummary, predict_cohort, watch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cohort", type=Path, help="folder of cases (any BraTS / MSD layout)")
    source.add_argument("--watch", type=Path, metavar="INBOX", help="poll this folder for new cohorts / cases")
    parser.add_argument(
        "--model",
        default="models:/bratstune-gli@champion",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/ensemble or a folder",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=1, help="parallel workers (1: in-process, no Ray)")
    parser.add_argument("--threads", type=int, help="torch threads per worker")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--force", action="store_true", help="re-predict every case")
    parser.add_argument("--no-thumbnails", action="store_true", help="skip the QC thumbnails")
    parser.add_argument("--interval", type=float, default=60.0, help="--watch: seconds between polls")
    parser.add_argument("--max-polls", type=int, help="--watch: stop after this many polls")
    parser.add_argument(
        "--settle",
        type=float,
        help="leave cases whose files changed in the last S seconds (default 0, 10 with --watch)",
    )
    parser.add_argument("--experiment", default="bratstune-predict", help="MLflow experiment of the batch runs")
    parser.add_argument("--no-mlflow", action="store_true", help="do not record an MLflow run")
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-tumour-share",
        type=float,
        help="plausibility: flag a whole tumour larger than this share of the brain mask (default 0.3)",
    )


def _init_ray(args: argparse.Namespace) -> None:
    if args.workers <= 1:
        return
    paths.keep_ray_on_loopback()  # before Ray is imported
    # Deferred: Ray takes seconds to import and only multi-worker runs use it.
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"py_modules": [str(Path(bratstune.__file__).parent)]})
    else:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers: expected >= 1, got {args.workers}")
    logging.getLogger("bratstune.predict.batch").setLevel(logging.INFO)
    options = dict(
        workers=args.workers,
        force=args.force,
        device=args.device,
        threads=args.threads,
        thumbnails=not args.no_thumbnails,
        progress=not args.no_progress,
        experiment=None if args.no_mlflow else args.experiment,
    )
    if args.max_tumour_share is not None:
        options["plausibility"] = {"max_brain_share": args.max_tumour_share}
    _init_ray(args)
    if args.cohort is not None:
        if args.settle is not None:
            options["settle_s"] = args.settle
        summary = predict_cohort(args.cohort, args.model, args.out, **options)
        _print(summary)
        return 0 if summary.ok else 1
    if args.settle is not None:
        options["settle_s"] = args.settle
    failed = False

    def on_batch(summary: BatchSummary) -> None:
        nonlocal failed
        _print(summary)
        failed = failed or not summary.ok

    try:
        watch(
            args.watch,
            args.model,
            args.out,
            interval=args.interval,
            max_polls=args.max_polls,
            on_batch=on_batch,
            **options,
        )
    except KeyboardInterrupt:
        print("stopped")
    return 1 if failed else 0


def _print(summary: BatchSummary) -> None:
    print(f"{summary.model}: {summary.line()}")
    for f in summary.failures:
        print(f"  FAILED {f['case_id']}: {f['reason']}")
    for case_id in summary.flagged:
        row = next(r for r in summary.rows if r["case_id"] == case_id)
        print(f"  drift {case_id}: {row['drift']}")
    for case_id in summary.implausible:
        row = next(r for r in summary.rows if r["case_id"] == case_id)
        print(f"  implausible {case_id}: {row['plausibility']}")
    for flag in summary.cohort_flags:
        print(f"  cohort: {flag}")
    print(
        f"outputs in {summary.out} (predictions.csv, failures.csv, report.html)"
        + (f"; MLflow run {summary.mlflow_run_id}" if summary.mlflow_run_id else "")
    )
