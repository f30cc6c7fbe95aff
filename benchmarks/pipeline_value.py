"""Does the searched pipeline beat the peers' fixed recipe, out of sample? Four arms, one budget.

    python benchmarks/pipeline_value.py                      # default budget, seeds 0 and 1, 2 CPU cores
    python benchmarks/pipeline_value.py --budget 4 --seeds 0 1 2 --workers 8   # scaled up for a GPU box
    python benchmarks/pipeline_value.py --smoke              # minutes: checks the plumbing, not the claim

| arm | loss | thresholds / post-processing | model |
| --- | --- | --- | --- |
| A | Dice+CE 1:1 | 0.5, none | one model trained for the whole budget (the peers' default) |
| B | A's loss | tuned on held-out validation cases | A's model |
| C | searched | tuned | one model: the search's best loss, trained with what the search left |
| D | searched | tuned, cross-fitted | the cross-validated ensemble of the search's best config |

**One budget** counted in trial-epochs (``epochs x steps_per_epoch`` patches each): A trains one
model for all of it; C spends part on the loss search and the rest on its final model; D spends
the same part on the search and the rest on the folds. B costs no training (decode tuning only).

**Honest figures**: every arm is scored on a test cohort generated with a seed that no training,
search, selection or tuning step saw (``seed + 1000``), with the brats2023 lesion-wise rules:
lesion-wise Dice and HD95 per region and their mean, with 95 % percentile-bootstrap intervals
over test cases, for each seed, plus the differences B - A (decode tuning), C - B (the loss
search), D - C (ensembling and selection) and D - A, D - B. It writes ``pipeline_value.csv``,
``pipeline_value.png`` and an MLflow run (experiment ``bratstune-benchmarks``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import _bootstrap  # noqa: E402

ARMS = ("A", "B", "C", "D")
METRICS = ("dice_lesion", "hd95_lesion")
REGIONS = ("WT", "TC", "ET", "mean")


@dataclass(frozen=True)
class Budget:
    """How the trial-epochs are shared out (``scale`` multiplies every epoch count)."""

    scale: int = 1
    steps_per_epoch: int = 25
    search_trials: int = 4
    search_epochs: int = 3
    folds: int = 3
    decode_trials: int = 40

    @property
    def total(self) -> int:
        return 24 * self.scale

    @property
    def search(self) -> int:
        return self.search_trials * self.search_epochs * self.scale

    @property
    def after_search(self) -> int:
        return self.total - self.search


def _bootstrap_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if data.size < 2 or np.all(data == data[0]):
        mean = float(data.mean()) if data.size else float("nan")
        return mean, mean, mean
    ci = bootstrap((data,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile", random_state=seed)
    return float(data.mean()), float(ci.confidence_interval.low), float(ci.confidence_interval.high)


def _config(loss: dict | None, epochs: int, budget: Budget) -> dict:
    from bratstune.presets import load_preset

    config = load_preset("unet")
    config.update(epochs=max(1, epochs), steps_per_epoch=budget.steps_per_epoch, device="cpu", amp="off")
    config["data"] = {**config.get("data", {}), "num_workers": 0}
    config["validation"] = {**config.get("validation", {}), "every_n_epochs": max(1, epochs // 3)}
    if loss is not None:
        config["loss"] = loss
    return config


def _tuned_decode(model, config, val_cases, scheme, budget: Budget):
    """Decode settings tuned on the model's held-out validation cases (never the test cohort)."""
    from bratstune.search.crossval.spec import DEFAULT_THRESHOLD_SPACE
    from bratstune.search.threshold_job import cache_probabilities
    from bratstune.search.threshold_space import parse_threshold_space
    from bratstune.search.thresholds import search_thresholds
    from bratstune.training.config import load_train_config
    from bratstune.training.fit import inference_settings

    cached = cache_probabilities(model, val_cases, inference_settings(load_train_config(config)))
    spec = parse_threshold_space(DEFAULT_THRESHOLD_SPACE)
    return search_thresholds(spec, cached, scheme, challenge="GLI", num_samples=budget.decode_trials).best


def run_seed(seed: int, budget: Budget, work: Path, cases: int, test_cases: int) -> dict[str, dict]:
    """The four arms for one seed; returns ``{arm: {case_id: metrics}}`` on the test cohort."""
    import ray

    from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
    from bratstune.data.layout import discover
    from bratstune.data.synthetic import generate_cohort
    from bratstune.ensemble.gate import score_ensemble
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.decode import DecodeSettings
    from bratstune.search.crossval import CrossValSpec, cross_validate
    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space
    from bratstune.search.tune import run_search
    from bratstune.training.fit import fit

    cohort = synthetic_cohort(cases=cases, shape=None, anatomy="atlas", seed=seed, root=work / f"train-{seed}")
    test_root = work / f"test-{seed}"
    if not (test_root / ".complete").is_file():
        generate_cohort(
            test_root, challenge="GLI", cases=test_cases, anatomy="atlas", seed=seed + 1000, start_index=5000
        )
        (test_root / ".complete").write_text("ok\n")
    test = discover(test_root).cases
    prepared = prepare_cohort(cohort, preprocess_config({}))
    data = split_train_val(prepared.cases, prepared.scheme, val_fraction=0.2, seed=seed)
    scheme = prepared.scheme
    dice_ce = {"weights": {"dice": 1.0, "ce": 1.0}}
    scores: dict[str, dict] = {}

    def ensemble(members, decode=None):
        return Ensemble.from_members(members, scheme=scheme, challenge="GLI", decode=decode, inference={"flips": False})

    t0 = time.perf_counter()
    a = fit(_config(dice_ce, budget.total, budget), data, out_dir=work / f"A-{seed}")
    scores["A"] = score_ensemble(ensemble([a]), test, tta=False)
    decode_b = _tuned_decode(a.model, a.config.to_dict(), data.val, scheme, budget)
    scores["B"] = score_ensemble(ensemble([a], decode_b), test, tta=False)
    print(f"seed {seed}: A and B in {time.perf_counter() - t0:.0f} s", flush=True)

    spec = load_search_space(_bootstrap.ROOT / "search_spaces" / "losses.yaml")
    search_epochs = budget.search_epochs * budget.scale
    base = {**spec.base, "epochs": search_epochs, "steps_per_epoch": budget.steps_per_epoch, "device": "cpu"}
    base["data"] = {**base.get("data", {}), "num_workers": 0}
    spec = spec.with_changes(
        num_samples=budget.search_trials,
        base=base,
        scheduler=replace(spec.scheduler, max_t=search_epochs, grace_period=1),
    )
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=_bootstrap.runtime_env(), log_to_driver=False)
    try:
        outcome = run_search(spec, prepare_data(spec, cohort), storage_path=work / f"search-{seed}", verbose=0)
        best_loss = outcome.best_config.to_dict()["loss"]
        c = fit(_config(best_loss, budget.after_search, budget), data, out_dir=work / f"C-{seed}")
        decode_c = _tuned_decode(c.model, c.config.to_dict(), data.val, scheme, budget)
        scores["C"] = score_ensemble(ensemble([c], decode_c), test, tta=False)
        cv = cross_validate(
            _config(best_loss, budget.after_search // budget.folds, budget),
            cohort,
            CrossValSpec(
                folds=budget.folds,
                selection="fixed",
                gate_fraction=0.0,
                threshold_trials=budget.decode_trials,
                storage_path=work / f"cv-{seed}",
            ),
        )
        scores["D"] = score_ensemble(cv.ensemble, test, tta=False)
    finally:
        ray.shutdown()
    print(f"seed {seed}: all arms in {time.perf_counter() - t0:.0f} s", flush=True)
    assert isinstance(decode_b, DecodeSettings)
    return scores


def summarise(per_seed: dict[int, dict[str, dict]]) -> list[dict]:
    """One row per (seed, arm, metric, region) with mean and 95 % interval; plus paired differences."""
    rows = []
    for seed, arms in per_seed.items():
        for arm in ARMS:
            for metric in METRICS:
                for region in REGIONS:
                    key = f"{metric}_{region}"
                    values = [m[key] for m in arms.get(arm, {}).values() if key in m]
                    mean, low, high = _bootstrap_ci(values, seed)
                    rows.append({"seed": seed, "arm": arm, "metric": key, "mean": mean, "ci_low": low, "ci_high": high})
        for better, worse in (("B", "A"), ("C", "B"), ("D", "C"), ("D", "A"), ("D", "B")):
            key = "dice_lesion_mean"
            cases = sorted(set(arms.get(better, {})) & set(arms.get(worse, {})))
            diffs = [arms[better][c][key] - arms[worse][c][key] for c in cases]
            mean, low, high = _bootstrap_ci(diffs, seed)
            rows.append(
                {"seed": seed, "arm": f"{better}-{worse}", "metric": key, "mean": mean, "ci_low": low, "ci_high": high}
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Per seed and arm: lesion-wise Dice and HD95 per region and their mean (Markdown)."""
    index = {(r["seed"], r["arm"], r["metric"]): r for r in rows}
    head = ["seed", "arm"] + [f"Dice {r}" for r in REGIONS] + [f"HD95 {r}" for r in REGIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for seed in sorted({r["seed"] for r in rows}):
        for arm in ARMS:
            cells = [str(seed), arm]
            for metric in METRICS:
                for region in REGIONS:
                    r = index.get((seed, arm, f"{metric}_{region}"))
                    cells.append(
                        "-" if r is None else (f"{r['mean']:.3f}" if metric == "dice_lesion" else f"{r['mean']:.1f}")
                    )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = out / "pipeline_value.csv"
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    seeds = sorted({r["seed"] for r in rows})
    for i, seed in enumerate(seeds):
        points = [r for r in rows if r["seed"] == seed and r["metric"] == "dice_lesion_mean" and r["arm"] in ARMS]
        x = [ARMS.index(r["arm"]) + 0.1 * i for r in points]
        y = [r["mean"] for r in points]
        err = [[r["mean"] - r["ci_low"] for r in points], [r["ci_high"] - r["mean"] for r in points]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=f"seed {seed}")
    ax.set_xticks(range(len(ARMS)), ARMS)
    ax.set_ylabel("lesion-wise Dice, mean of WT/TC/ET (test cohort)")
    ax.legend()
    plot = out / "pipeline_value.png"
    fig.savefig(plot, dpi=100, bbox_inches="tight")
    return table, plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=int, default=1, help="multiplies every epoch count (default 1: 24 trial-epochs)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cases", type=int, default=30, help="training cohort size per seed")
    parser.add_argument("--test-cases", type=int, default=12, help="test cohort size per seed")
    parser.add_argument("--out", type=Path, default=Path(".bratstune/benchmarks/pipeline_value"))
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks the plumbing only")
    args = parser.parse_args(argv)
    budget = Budget(scale=args.budget)
    if args.smoke:
        budget = Budget(scale=1, steps_per_epoch=2, search_trials=2, search_epochs=1, folds=2, decode_trials=5)
        args.cases, args.test_cases, args.seeds = 8, 3, args.seeds[:1]

    import mlflow

    from bratstune.tracking import runs as tracking

    started = time.perf_counter()
    per_seed = {seed: run_seed(seed, budget, args.out.resolve(), args.cases, args.test_cases) for seed in args.seeds}
    rows = summarise(per_seed)
    table, plot = write_outputs(rows, args.out)
    experiment_id = tracking.setup_mlflow("bratstune-benchmarks")
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline_value"):
        mlflow.log_params({"budget_trial_epochs": budget.total, "seeds": json.dumps(args.seeds), "cases": args.cases})
        for r in rows:
            if r["metric"] == "dice_lesion_mean":
                mlflow.log_metric(f"seed{r['seed']}/{r['arm']}/dice_lesion_mean", r["mean"])
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(plot))
    print("\n" + markdown_table(rows))
    print("\nlesion-wise Dice (mean of WT/TC/ET) on the test cohort, 95 % bootstrap intervals over cases:")
    for r in rows:
        if r["metric"] == "dice_lesion_mean":
            print(f"  seed {r['seed']}  {r['arm']:>4}  {r['mean']:.3f}  [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    print(f"{table}\n{plot}\n{(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
