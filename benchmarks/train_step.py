"""Time one training step of the default CPU configuration: data wait vs compute.

Fixed configuration: ``unet`` preset network (DynUNet, filters 16-32-64-128, deep supervision),
48^3 patches, batch 2, Dice + CE, Adam, no validation. Data: a small procedural synthetic GLI
cohort (default 120x120x78 at 2 mm), prepared in the preprocessing cache and loaded by
background DataLoader workers, exactly as ``bratstune.training.fit.fit`` does it.

The first epoch warms up (worker start, allocator, first patches); the numbers are the means
per step over the following epochs. The loader keeps up when data wait < 10 % of the step.

    python benchmarks/train_step.py                  # 8 cases, 3 x 10 steps, auto workers
    python benchmarks/train_step.py --workers 0      # loading in the training process
    python benchmarks/train_step.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="synthetic cases (default 8)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape (default the generator's)")
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (default 10)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs, the first one is warm-up (default 3)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default automatic)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--augment", action="store_true", help="enable the default augmentation pipeline")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep cohort and cache here (default temp)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from bratstune.data.cache import CaseCache
    from bratstune.data.cohort import TrainData
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import PreprocessConfig
    from bratstune.data.synthetic import generate_cohort
    from bratstune.labels import scheme_for
    from bratstune.presets import load_preset
    from bratstune.training.fit import fit

    with tempfile.TemporaryDirectory(prefix="bratstune-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        raw = work / "cohort"
        t0 = time.perf_counter()
        if not raw.is_dir():
            generate_cohort(
                raw,
                challenge="GLI",
                cases=args.cases,
                shape=tuple(args.shape) if args.shape else None,
                anatomy="procedural",
                seed=0,
            )
        cases = CaseCache(work / "cache").prepare(discover(raw).cases, PreprocessConfig(), workers=2)
        print(
            f"cohort: {len(cases)} cases, cropped shapes {sorted({c.shape for c in cases})[:3]}..., "
            f"prepared in {time.perf_counter() - t0:.1f} s"
        )

        config = load_preset("unet")
        config.update(
            epochs=args.epochs,
            steps_per_epoch=args.steps,
            num_threads=args.threads,
            device=args.device,
            amp=args.amp,
        )
        config["data"] = {
            **config["data"],
            "patch_size": [args.patch] * 3,
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "augment": {} if args.augment else None,
        }
        result = fit(config, TrainData(train=cases, val=[], scheme=scheme_for("GLI")), out_dir=work / "run")

    rows = result.history[1:] or result.history
    wait = sum(r["time/data_wait_s"] for r in rows) / len(rows)
    compute = sum(r["time/compute_s"] for r in rows) / len(rows)
    step = wait + compute
    import torch

    from bratstune.device import default_num_workers

    workers = args.workers if args.workers is not None else default_num_workers()
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, workers {workers}, "
        f"patch {args.patch}^3, batch {args.batch_size}, augment {args.augment}"
    )
    for row in result.history:
        print(
            f"  epoch {int(row['epoch'])}: data wait {row['time/data_wait_s'] * 1e3:7.1f} ms/step, "
            f"compute {row['time/compute_s']:.3f} s/step, loss {row['train/loss']:.4f}"
        )
    ratio = wait / step if step > 0 else 0.0
    print(
        f"per step (epochs 2+): {step:.3f} s = data wait {wait * 1e3:.1f} ms + compute {compute:.3f} s; "
        f"data wait {ratio:.1%} of the step ({'OK' if ratio < 0.10 else 'loader too slow'}: target < 10 %)"
    )
    return 0 if ratio < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
