"""`make demo`: the whole story on the embedded defaults, one step after another.

synthetic GLI cohort -> inspect -> train one unet -> loss search (Ray Tune + Optuna + ASHA)
-> cross-validated ensemble of the best config with tuned thresholds -> promotion to
`bratstune-gli@champion` -> batch prediction over a freshly generated cohort.

Each step is the code path a user reaches through the `bratstune` CLI or a job script; the
demo only picks small budgets so that it fits two CPU cores. The cohort is generated once and
reused; every run and model lands in MLflow under `.bratstune/`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bratstune import paths
from bratstune.cli import main as cli
from bratstune.data.synthetic import generate_cohort
from bratstune.inference.decode import DEFAULT_POSTPROCESS
from bratstune.predict.report import add_reference_scores
from bratstune.search import crossval
from bratstune.search import tune as search
from bratstune.search.data import synthetic_cohort

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Budgets of the demo; the defaults fit an idle two-core machine in about 15 minutes.

    Every model is the full-size CPU ``unet`` preset; step 3, the search trials and the CV folds
    get similar step budgets, so each step's score can be read against the previous one. Their
    patches are 40³ rather than the preset's 48³: 0.36 instead of 0.6 s per step on two cores,
    for the same lesion-wise Dice on the demo cohort after 200 steps (0.75 at 0.5 with dust removal).
    """

    challenge: str = "GLI"
    cases: int = 40
    anatomy: str = "atlas"
    seed: int = 0
    train_epochs: int = 4
    train_steps: int = 40
    search_trials: int = 4
    search_epochs: int = 4
    search_steps: int = 40
    folds: int = 3
    cv_epochs: int = 4
    cv_steps: int = 50
    threshold_trials: int = 30
    patch_size: int = 40
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


class _Scores:
    """Each model-producing step's mean lesion-wise Dice (brats2023), printed next to the previous ones."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float | None]] = []

    def add(self, step: str, value: float | None) -> None:
        previous = self.rows[-1] if self.rows else None
        self.rows.append((step, value))
        text = f"lesion-wise Dice (mean WT/TC/ET): {_fmt(value)}"
        if previous is not None:
            text += f"   (previous step, {previous[0]}: {_fmt(previous[1])})"
        print(text, flush=True)

    def print(self) -> None:
        print("\nlesion-wise Dice of every model the demo produced (brats2023 rules):")
        for step, value in self.rows:
            print(f"  {_fmt(value):>6}  {step}")


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _best_metric(train_out: Path, name: str = "val/dice_lesion_mean") -> float | None:
    """The best epoch's metric of a ``bratstune train`` output folder (``best/metrics.json``)."""
    path = train_out / "best" / "metrics.json"
    return json.loads(path.read_text()).get(name) if path.is_file() else None


def _mean_of(summary: dict[str, dict[str, float]], key: str, regions: tuple[str, ...] = ("WT", "TC", "ET")) -> float:
    """Mean over regions of one per-region metric of ``bratstune evaluate --json``'s summary."""
    values = [summary[r][key] for r in regions if r in summary and key in summary[r]]
    return float(sum(values) / len(values)) if values else float("nan")


def _patch(config: DemoConfig) -> dict[str, Any]:
    """The training-config override that gives every model of the demo the same patch size."""
    return {"data": {"patch_size": [config.patch_size] * 3}}


def _train(cli: Any, cohort: Path, config: DemoConfig, out: Path) -> int:
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
            "--set",
            f"data.patch_size={config.patch_size}",
            "--set",
            # scored like the search trials: after the default dust removal, which BraTS teams apply
            f"validation.postprocess={json.dumps(DEFAULT_POSTPROCESS)}",
            "--workers",
            str(config.workers),
            "--run-name",
            "demo-unet",
            "--out",
            str(out),
        ]
    )


def run_demo(
    config: DemoConfig = DemoConfig(), *, runtime_env: dict | None = None, search_space: Path | None = None
) -> int:
    """Run every step of the demo; returns a process exit code."""
    paths.keep_ray_on_loopback()  # before Ray is imported
    # Deferred: Ray is needed only on this path (and takes seconds to import).
    import ray  # noqa: PLC0415

    started = time.perf_counter()
    scores = _Scores()
    with _Step(f"1. synthetic {config.challenge} cohort ({config.cases} cases, {config.anatomy} anatomy)"):
        cohort = synthetic_cohort(
            cases=config.cases, shape=None, anatomy=config.anatomy, challenge=config.challenge, seed=config.seed
        )
        print(f"cohort: {cohort}")
    with _Step("2. bratstune inspect"):
        if cli(["inspect", str(cohort), "--workers", str(config.workers)]) != 0:
            return 1
    with _Step(f"3. bratstune train (unet, {config.train_epochs} epochs x {config.train_steps} steps)"):
        train_out = paths.results_dir() / "demo-train"
        if _train(cli, cohort, config, train_out) != 0:
            return 1
        scores.add("3. one unet (its validation cases, dust removed)", _best_metric(train_out))

    ray.init(num_cpus=config.workers, include_dashboard=False, runtime_env=runtime_env or {}, log_to_driver=False)
    try:
        with _Step(f"4. loss search ({config.search_trials} trials, ASHA, Optuna TPE)"):
            space = search_space or Path(__file__).resolve().parents[2] / "search_spaces" / "losses.yaml"
            outcome = search.demo_search(
                space,
                cohort,
                num_samples=config.search_trials,
                epochs=config.search_epochs,
                steps_per_epoch=config.search_steps,
                base=_patch(config),
                verbose=1,
            )
            print(f"best val/dice_lesion_mean {_fmt(outcome.best_metric)} with {outcome.best_values}")
            scores.add("4. best search trial (its validation cases, dust removed)", outcome.best_metric)
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
                overrides=_patch(config),
            )
            print(f"ensemble: {cv.ensemble_dir}")
            scores.add("5. CV ensemble (cross-fitted, out of sample)", cv.oos_metrics.get("dice_lesion_mean"))
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
    with _Step("8. the champion scored on the new cohort (its labels are used for this report only)"):
        reference = out / "reference_scores.json"
        cli(
            [
                "evaluate",
                "--pred",
                str(out),
                "--gt",
                str(inbox),
                "--challenge",
                config.challenge,
                "--json",
                str(reference),
            ]
        )
        summary = json.loads(reference.read_text()).get("summary", {})
        add_reference_scores(out / "report.html", summary, source=f"the synthetic labels of {inbox.name}")
        scores.add("8. champion on the new cohort", _mean_of(summary, "lesionwise_dice"))
        print(f"lesion-wise HD95 mean on the new cohort: {_mean_of(summary, 'lesionwise_hd95'):.1f} mm")
    scores.print()

    print(f"\n=== done in {(time.perf_counter() - started) / 60:.1f} min ===")
    print(f"segmentations and predictions.csv: {out}")
    print(f"QC report:                         {out / 'report.html'}")
    print(f"everything else:                   {paths.home()}")
    print(f"compare the trials: {outcome.ui_command}")
    return 0
