"""Does a CPU `unet` reach the issue's Dice targets on the synthetic GLI cohort within 15 minutes?

Trains the `unet` preset on the default synthetic GLI cohort (40 atlas cases: 32 train / 8
held out) through the same path as `bratstune train`, then prints the held-out legacy Dice per
region, the wall-clock time and whether the targets (WT >= 0.80, TC >= 0.60, ET >= 0.60) hold.

    python benchmarks/train_convergence.py [--epochs 20] [--steps 45]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

TARGETS = {"WT": 0.80, "TC": 0.60, "ET": 0.60}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--data", type=Path, help="existing cohort (default: generate one)")
    args = parser.parse_args(argv)

    import logging

    import torch

    from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
    from bratstune.data.synthetic import generate_cohort
    from bratstune.labels import get_scheme
    from bratstune.presets import load_preset
    from bratstune.training.config import load_train_config
    from bratstune.training.fit import fit
    from bratstune.training.network import resolve_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bratstune-conv-"))
    data = args.data
    if data is None:
        data = work / "GLI"
        t = time.perf_counter()
        generate_cohort(data, challenge="GLI", cases=args.cases, anatomy="atlas", seed=0, workers=2)
        print(f"generated {args.cases} cases in {time.perf_counter() - t:.1f} s")
    raw = load_preset("unet")
    raw.update(epochs=args.epochs, steps_per_epoch=args.steps, challenge="GLI")
    raw["validation"] = {"every_n_epochs": max(1, args.epochs // 4)}
    config = resolve_config(load_train_config(raw))
    prepared = prepare_cohort(data, preprocess_config(config.data.preprocess), workers=2)
    split = split_train_val(prepared.cases, prepared.scheme, val_fraction=0.2, seed=0)
    start = time.perf_counter()
    result = fit(config, split, out_dir=work / "run")
    minutes = (time.perf_counter() - start) / 60
    m = result.best_metrics
    print(
        f"\nunet, {len(split.train)} train / {len(split.val)} held-out cases, "
        f"{args.epochs} epochs x {args.steps} steps, {minutes:.1f} min of training on "
        f"{torch.get_num_threads()} threads (best epoch {result.best_epoch})"
    )
    ok = True
    for region, target in TARGETS.items():
        value = m.get(f"val/dice_{region}", float("nan"))
        ok &= value >= target
        print(f"  legacy Dice {region}: {value:.3f} (target >= {target:.2f})")
    if "val/dice_lesion_mean" in m:
        print(
            "  lesion-wise Dice: "
            + "  ".join(
                f"{r} {m[f'val/dice_lesion_{r}']:.3f}"
                for r in get_scheme("brats2023").regions
                if f"val/dice_lesion_{r}" in m
            )
        )
    print(f"targets {'met' if ok else 'NOT met'} in {minutes:.1f} min (budget 15 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
