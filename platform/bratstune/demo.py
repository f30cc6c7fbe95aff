"""`make demo`: the whole story on the embedded defaults, one step after another.

synthetic GLI cohort -> inspect -> train one unet -> loss search (Ray Tune + Optuna + ASHA)
-> cross-validated ensemble of the best config with tuned thresholds -> promotion to
`bratstune-gli@champion` -> batch prediction over a freshly generated cohort.

Each step is the code path a user reaches through the `bratstune` CLI or a job script; the
demo only picks small budgets so that it fits two CPU cores. The cohort is generated once and
reused; every run and model lands in MLflow under `.bratstune/`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bratstune import paths
from bratstune.cli import main as cli
from bratstune.data.synthetic import generate_cohort
from bratstune.search import crossval
from bratstune.search import tune as search
from bratstune.search.data import synthetic_cohort

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Budgets of the demo; the defaults fit two CPU cores in well under 20 minutes."""

    challenge: str = "GLI"
    cases: int = 40
    anatomy: str = "atlas"
    seed: int = 0
    train_epochs: int = 5
    train_steps: int = 30
    search_trials: int = 6
    search_epochs: int = 4
    folds: int = 3
    cv_epochs: int = 4
    cv_steps: int = 40
    threshold_trials: int = 10
    new_cases: int = 6
    workers: int = 2
    model_name: str = "bratstune-gli"


class _Step:
    """Prints a numbered banner and, on exit, how long the step took."""

    def __init__(self, title: str) -> None:
        self.title = title

    def __enter__(self) -> _Step:
        print(f"\n=== {self.title} ===", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        print(f"--- {time.perf_counter() - self.start:.0f} s", flush=True)


def _train(cli: Any, cohort: Path, config: DemoConfig) -> int:
    return cli(
        [
            "train",
            "--data",
            str(cohort),
            "--preset",
            "unet",
            "--set",
            f"epochs={config.train_epochs}",
            "--set",
            f"steps_per_epoch={config.train_steps}",
            "--set",
            f"validation.every_n_epochs={config.train_epochs // 2}",
            "--set",
            f"seed={config.seed}",
            "--workers",
            str(config.workers),
            "--run-name",
            "demo-unet",
        ]
    )


def run_demo(
    config: DemoConfig = DemoConfig(), *, runtime_env: dict | None = None, search_space: Path | None = None
) -> int:
    """Run every step of the demo; returns a process exit code."""
    # Before Ray is imported: keep every Ray process on 127.0.0.1 (see STACK-NOTES).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Deferred: Ray is needed only on this path (and takes seconds to import).
    import ray  # noqa: PLC0415

    started = time.perf_counter()
    with _Step(f"1. synthetic {config.challenge} cohort ({config.cases} cases, {config.anatomy} anatomy)"):
        cohort = synthetic_cohort(
            cases=config.cases, shape=None, anatomy=config.anatomy, challenge=config.challenge, seed=config.seed
        )
        print(f"cohort: {cohort}")
    with _Step("2. bratstune inspect"):
        if cli(["inspect", str(cohort), "--workers", str(config.workers)]) != 0:
            return 1
    with _Step(f"3. bratstune train (unet, {config.train_epochs} epochs x {config.train_steps} steps)"):
        if _train(cli, cohort, config) != 0:
            return 1

    ray.init(num_cpus=config.workers, include_dashboard=False, runtime_env=runtime_env or {}, log_to_driver=False)
    try:
        with _Step(f"4. loss search ({config.search_trials} trials, ASHA, Optuna TPE)"):
            space = search_space or Path(__file__).resolve().parents[2] / "search_spaces" / "losses.yaml"
            outcome = search.demo_search(
                space, cohort, num_samples=config.search_trials, epochs=config.search_epochs, verbose=1
            )
            print(f"best val/dice_mean {outcome.best_metric:.3f} with {outcome.best_values}")
        with _Step(f"5. {config.folds}-fold cross-validated ensemble of the best config, tuned thresholds, promotion"):
            cv = crossval.demo_cross_validate(
                cohort,
                outcome.best_config,
                folds=config.folds,
                epochs=config.cv_epochs,
                steps=config.cv_steps,
                register=config.model_name,
                search_run_id=outcome.parent_run_id,
                threshold_trials=config.threshold_trials,
            )
            print(f"ensemble: {cv.ensemble_dir}")
    finally:
        ray.shutdown()
    with _Step("6. registry"):
        cli(["models", "list", "--name", config.model_name])
    with _Step(f"7. batch prediction of {config.new_cases} new cases with {config.model_name}@champion"):
        inbox = paths.data_dir() / f"new-{config.challenge}-cohort"
        if not (inbox / ".complete").is_file():
            generate_cohort(
                inbox,
                challenge=config.challenge,
                cases=config.new_cases,
                anatomy=config.anatomy,
                seed=config.seed + 1,
                start_index=1000,
            )
            (inbox / ".complete").write_text("ok\n")
        out = paths.results_dir() / "predictions"
        code = cli(
            [
                "predict",
                "--cohort",
                str(inbox),
                "--model",
                f"models:/{config.model_name}@champion",
                "--out",
                str(out),
                "--workers",
                "1",
            ]
        )
        if code != 0:
            return code

    print(f"\n=== done in {(time.perf_counter() - started) / 60:.1f} min ===")
    print(f"segmentations and predictions.csv: {out}")
    print(f"QC report:                         {out / 'report.html'}")
    print(f"everything else:                   {paths.home()}")
    print(f"compare the runs:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{paths.home() / 'mlflow.db'}")
    return 0
