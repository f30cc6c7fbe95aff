"""`make demo`: the whole story on the embedded defaults, one step after another.

Each step is the same code path a user reaches through the `bratstune` CLI or a job
script; the demo only chooses small budgets so that it fits a laptop. Steps are
idempotent where that is cheap (the cohort is generated once and reused).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bratstune import paths

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Budgets of the demo; the defaults fit two CPU cores."""

    challenge: str = "GLI"
    cases: int = 40
    anatomy: str = "atlas"
    seed: int = 0
    train_epochs: int = 8
    train_steps: int = 40
    workers: int = 2


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def ensure_cohort(root: Path, config: DemoConfig) -> Path:
    """Generate the synthetic cohort unless a complete one is already there."""
    from bratstune.data.synthetic import generate_cohort

    folder = root / f"{config.challenge}-{config.anatomy}-{config.cases}"
    marker = folder / ".complete"
    if marker.is_file():
        print(f"reusing synthetic cohort {folder}")
        return folder
    start = time.perf_counter()
    ids = generate_cohort(folder, challenge=config.challenge, cases=config.cases,
                          anatomy=config.anatomy, seed=config.seed, workers=config.workers)
    marker.write_text("\n".join(ids) + "\n")
    took = time.perf_counter() - start
    print(f"generated {len(ids)} {config.challenge} cases in {took:.1f} s ({took / len(ids):.2f} s/case) -> {folder}")
    return folder


def run_demo(config: DemoConfig = DemoConfig()) -> int:
    """Run every step of the demo; returns a process exit code."""
    from bratstune.cli import main as cli

    _banner(f"1. synthetic {config.challenge} cohort ({config.cases} cases, {config.anatomy} anatomy)")
    cohort = ensure_cohort(paths.data_dir(), config)

    _banner("2. bratstune inspect")
    code = cli(["inspect", str(cohort), "--workers", str(config.workers)])
    if code != 0:
        return code

    _banner(f"3. bratstune train (unet, {config.train_epochs} epochs x {config.train_steps} steps)")
    code = cli([
        "train", "--data", str(cohort), "--preset", "unet",
        "--set", f"epochs={config.train_epochs}",
        "--set", f"steps_per_epoch={config.train_steps}",
        "--set", "validation.every_n_epochs=2",
        "--set", f"seed={config.seed}",
        "--workers", str(config.workers),
        "--run-name", "demo-unet",
    ])
    if code != 0:
        return code

    _banner("done")
    print(f"everything lives under {paths.home()}")
    print(f"browse the runs:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{paths.home() / 'mlflow.db'}")
    return 0
