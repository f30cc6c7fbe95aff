"""Batch-prediction speed: seconds per case split into load / preprocess / network / post-process / write.

    python benchmarks/batch_predict.py                    # default synthetic size + 240x240x155, 1 vs 2 workers
    python benchmarks/batch_predict.py --quick            # tiny network, fewer cases (a smoke run)
    python benchmarks/batch_predict.py --tta flips        # 8 test-time views (network time x 8)

Two cohorts are generated (cached under ``--work``): the synthetic default grid (120x120x78 at
2 mm, atlas anatomy) and a BraTS-sized 240x240x155 at 1 mm (procedural anatomy). The ensemble is
one untrained but deterministic network (weights do not change the speed): MONAI DynUNet
``--filters`` with a ``--roi``^3 window, ``--overlap`` and Gaussian blending. Each cohort is
predicted in-process (one worker, all torch threads) and the default-size cohort again with
1 and 2 Ray actors (one torch thread each) for the speed-up. QC thumbnails are written (their time
is reported as ``qc``); no MLflow run is recorded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

STAGES = ("load_s", "preprocess_s", "network_s", "postprocess_s", "write_s", "qc_s")


def build_ensemble(folder: Path, *, filters: list[int], roi: int, overlap: float, tta: str) -> Path:
    import torch

    from bratstune.ensemble.member import Member
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig
    from bratstune.labels import scheme_for
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    config = resolve_config(
        load_train_config(
            {
                "model": {"name": "unet", "kwargs": {"filters": filters, "deep_supr_num": 1}},
                "data": {"patch_size": roi},
                "challenge": "GLI",
            }
        )
    )
    torch.manual_seed(0)
    model = build_network(config, scheme_for("GLI")).eval()
    inference = InferenceConfig(overlap=overlap, flips=tta != "none", rotate90=tta == "flips+rot90")
    ensemble = Ensemble.from_members(
        [Member("bench", config, model)],
        scheme="brats2023",
        challenge="GLI",
        inference=inference,
        metrics={"val/dice_mean": 0.0},
    )
    return ensemble.save(folder)


def cohort(folder: Path, *, cases: int, shape: tuple[int, int, int] | None, anatomy: str) -> Path:
    from bratstune.data.synthetic import generate_cohort

    if not folder.is_dir() or len(list(folder.iterdir())) < cases:
        shutil.rmtree(folder, ignore_errors=True)
        generate_cohort(folder, challenge="GLI", cases=cases, shape=shape, anatomy=anatomy, seed=0, workers=1)
    return folder


def run(
    label: str, data: Path, model: Path, out: Path, *, workers: int, threads: int | None, use_ray: bool | None = None
) -> float:
    import csv

    from bratstune.predict.batch import predict_cohort

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = predict_cohort(
        data, model, out, workers=workers, threads=threads, progress=False, experiment=None, use_ray=use_ray
    )
    wall = time.perf_counter() - start
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    mean = {s: sum(float(r[s]) for r in rows) / len(rows) for s in STAGES}
    per_case = sum(mean.values())
    shape = rows[0]["shape"]
    split = "  ".join(f"{s[:-2]} {mean[s]:6.2f}" for s in STAGES)
    print(
        f"{label:<34} {shape:>12}  {len(rows)} cases  {per_case:7.2f} s/case  [{split}]  "
        f"wall {wall:6.1f} s ({wall / len(rows):.2f} s/case){'' if summary.ok else '  FAILURES'}"
    )
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bratstune-bench-predict")
    parser.add_argument("--cases", type=int, default=4, help="cases of the default-size cohort")
    parser.add_argument("--large-cases", type=int, default=2, help="cases at 240x240x155")
    parser.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--tta", choices=["none", "flips", "flips+rot90"], default="none")
    parser.add_argument("--no-large", action="store_true", help="skip the 240x240x155 cohort")
    parser.add_argument("--no-ray", action="store_true", help="skip the 1 vs 2 Ray workers comparison")
    parser.add_argument("--quick", action="store_true", help="tiny network, 2 + 1 cases")
    args = parser.parse_args(argv)
    if args.quick:
        args.filters, args.roi, args.cases, args.large_cases = [8, 16, 32], 48, 2, 1
    import torch

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = build_ensemble(work / "model", filters=args.filters, roi=args.roi, overlap=args.overlap, tta=args.tta)
    print(
        f"ensemble: unet {args.filters}, window {args.roi}^3, overlap {args.overlap}, TTA {args.tta}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    default = cohort(work / "default", cases=args.cases, shape=None, anatomy="atlas")
    run("default synthetic, in-process", default, model, work / "out-default", workers=1, threads=None)
    if not args.no_large:
        large = cohort(work / "large", cases=args.large_cases, shape=(240, 240, 155), anatomy="procedural")
        run("240x240x155, in-process", large, model, work / "out-large", workers=1, threads=None)
    if not args.no_ray:
        import ray

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="rbb", dir="/tmp"),
        )
        try:
            one = run_ray("default synthetic, 1 Ray worker x 1 thread", default, model, work / "out-ray1", 1)
            two = run_ray("default synthetic, 2 Ray workers x 1 thread", default, model, work / "out-ray2", 2)
            print(f"speed-up 1 -> 2 Ray workers: {one / two:.2f}x (wall clock of the whole batch)")
        finally:
            ray.shutdown()
    return 0


def run_ray(label: str, data: Path, model: Path, out: Path, workers: int) -> float:
    """Like :func:`run`, but always through Ray actors (one torch thread each)."""
    return run(label, data, model, out, workers=workers, threads=1, use_ray=True)


if __name__ == "__main__":
    sys.exit(main())
