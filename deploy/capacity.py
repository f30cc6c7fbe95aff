"""Capacity model: wall time of a full search (32 trials x 5 folds, 128^3, 300 epochs) on N GPUs.

    python deploy/capacity.py                      # the tables of deploy/README.md (8 x A100-class)
    python deploy/capacity.py --gpu a10g --gpus 16
    python deploy/capacity.py --step unet=0.085    # a GPU step time you measured (s), replaces the estimate

Step times measured here (2 CPU threads, ``benchmarks/train_step.py`` and the presets, at the
preset's patch and batch) are scaled to 128^3 x batch 2 by voxel count and divided by a stated
GPU/CPU speed ratio; everything else follows from the search's settings. Every input is a named
constant below, so a measured number replaces a guessed one in one place.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

#: seconds per training step on 2 CPU threads (torch 2.13 CPU), at (patch edge, batch): the presets.
CPU_STEP = {
    "unet": (0.64, 48, 2),
    "resunet": (0.12, 48, 2),
    "attention_unet": (0.64, 48, 2),
    "unetr": (0.99, 48, 2),
    "segresnet": (0.72, 48, 2),
    "swin_unetr": (4.1, 64, 1),
}
#: GPU speed over those 2 CPU threads on this workload (AMP on the GPU, fp32 on the CPU).
GPU_RATIO = {"a10g": 40.0, "a100": 120.0, "h100": 200.0}
STEP_FLOOR_S = 0.05  # per step, whatever the network: loader hand-off, launches, optimiser, logging


@dataclass(frozen=True)
class Search:
    """The full search and the cluster it runs on."""

    trials: int = 32
    folds: int = 5
    epochs: int = 300
    steps_per_epoch: int = 250
    patch: int = 128
    batch: int = 2
    val_cases: int = 250  # a fifth of BraTS 2023 GLI's 1251 training cases
    val_every: int = 10
    windows_per_case: int = 8  # a cropped 1-mm case (about 160 x 190 x 140) at roi 128^3, overlap 0.5
    val_io_s: float = 0.3  # load, crop, write-back per validation case
    grace: int = 30  # ASHA
    reduction: int = 3
    gpus: int = 8
    utilisation: float = 0.85  # trial start-up, checkpoints, scheduling gaps, the last rung's idle GPUs


def gpu_step(arch: str, ratio: float, search: Search) -> float:
    """Estimated seconds per training step on one GPU at ``search.patch``^3 x ``search.batch``."""
    seconds, edge, batch = CPU_STEP[arch]
    voxels = (search.patch / edge) ** 3 * (search.batch / batch)
    return max(STEP_FLOOR_S, seconds * voxels / ratio)


def epoch_seconds(step: float, search: Search) -> float:
    """One epoch of one fold: training steps plus its share of a validation pass."""
    forward_per_window = step / search.batch / 3  # a forward pass is about a third of a step
    case = search.windows_per_case * forward_per_window + search.val_io_s
    return search.steps_per_epoch * step + search.val_cases * case / search.val_every


def asha_epochs(search: Search) -> float:
    """Expected epochs of one fold summed over all trials, ASHA stopping 2 in 3 at each rung."""
    rungs, rung = [], search.grace
    while rung < search.epochs:
        rungs.append(rung)
        rung *= search.reduction
    total, alive, done = 0.0, float(search.trials), 0
    for rung in [*rungs, search.epochs]:
        total += alive * (rung - done)
        alive, done = alive / search.reduction, rung
    return total


def estimate(arch: str, ratio: float, search: Search) -> dict[str, float]:
    step = gpu_step(arch, ratio, search)
    epoch = epoch_seconds(step, search)
    fold_full = search.epochs * epoch
    capacity = search.gpus * search.utilisation
    full = search.trials * search.folds * fold_full / capacity
    asha = max(search.folds * asha_epochs(search) * epoch / capacity, fold_full)
    return {
        "step_s": step,
        "epoch_min": epoch / 60,
        "fold_h": fold_full / 3600,
        "full_h": full / 3600,
        "asha_h": asha / 3600,
    }


def _days(hours: float) -> str:
    return f"{hours:.0f} h ({hours / 24:.1f} d)" if hours >= 48 else f"{hours:.1f} h"


def table(ratio: float, search: Search, label: str) -> str:
    lines = [
        f"{search.trials} trials x {search.folds} folds, {search.patch}^3 x {search.batch}, up to {search.epochs} epochs"
        f" x {search.steps_per_epoch} steps, on {search.gpus} GPUs ({label}, {ratio:g} x 2 CPU threads), one fold per GPU:",
        "",
        "| architecture | GPU step | epoch | one fold, 300 epochs | all 300 epochs (no early stop) | with ASHA |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arch in CPU_STEP:
        e = estimate(arch, ratio, search)
        lines.append(
            f"| {arch} | {e['step_s']:.2f} s | {e['epoch_min']:.1f} min | {e['fold_h']:.1f} h"
            f" | {_days(e['full_h'])} | {_days(e['asha_h'])} |"
        )
    asha = asha_epochs(search)
    lines += [
        "",
        f"ASHA (grace {search.grace}, reduction {search.reduction}, max_t {search.epochs}) trains"
        f" {asha:.0f} fold-epochs per fold index instead of {search.trials * search.epochs}"
        f" ({search.trials * search.epochs / asha:.1f}x less).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=sorted(GPU_RATIO), default="a100", help="GPU class (speed ratio)")
    parser.add_argument("--gpus", type=int, default=Search.gpus)
    parser.add_argument("--step", action="append", default=[], metavar="ARCH=SECONDS", help="measured GPU step")
    args = parser.parse_args(argv)
    search = Search(gpus=args.gpus)
    ratio = GPU_RATIO[args.gpu]
    for item in args.step:
        arch, _, seconds = item.partition("=")
        edge, batch = CPU_STEP[arch][1:]
        # a measured GPU step stands for itself: store it as a CPU time of ratio x that step
        voxels = (search.patch / edge) ** 3 * (search.batch / batch)
        CPU_STEP[arch] = (float(seconds) * ratio / voxels, edge, batch)
    print(table(ratio, search, args.gpu.upper()))
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
