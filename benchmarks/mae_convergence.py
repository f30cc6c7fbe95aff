"""Does MAE pre-training speed up UNETR / TransUNet fine-tuning? And how does pre-training scale with workers?

1. Synthetic data (procedural anatomy, 2 mm-like 64x64x48 volumes): a small *labelled* GLI
   cohort for fine-tuning (train + validation cases) and separate *unlabelled* cohorts of three
   challenges (GLI with other seeds, MEN, PED) for pre-training; validation cases are never seen
   by the MAE.
2. MAE pre-training with ``bratstune.pretrain.run.run_mae`` on Ray Train: ``--workers`` (default 2)
   gloo workers for ``--mae-epochs``; the encoder is registered in a throw-away MLflow store.
   A short second run with 1 worker measures single-worker throughput (epochs after the first).
3. Fine-tuning ``--model`` (``unetr``, or ``transunet_enc``: the 3D-TransUNet encoder-only
   variant, whose ViT blocks take the MAE's; its patch embedding is its own) with
   ``bratstune.training.fit.fit`` with the same budget and data, for every seed of ``--seeds``:
   from scratch, and with ``init.encoder_from: models:/bratstune-mae-encoder@latest``.
   Validation (sliding window, legacy Dice) after every epoch.

Printed: the validation Dice curve of every run, the steps to reach ``--target`` Dice (first
validated epoch x steps per epoch), the final and best Dice, and pre-training throughput
(samples/s) with 1 vs N workers (``--throughput-epochs 0`` skips that run).

    python benchmarks/mae_convergence.py                      # about 10 minutes on 2 busy cores
    python benchmarks/mae_convergence.py --model transunet_enc --seeds 0 1 --throughput-epochs 0
    python benchmarks/mae_convergence.py --mae-epochs 60 --ft-epochs 15 --cases 16
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "bratstune"
if str(PACKAGE.parent) not in sys.path:
    sys.path.insert(0, str(PACKAGE.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

VIT = {"hidden_size": 96, "mlp_dim": 384, "num_heads": 4}
SHAPE = (64, 64, 48)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=9, help="labelled GLI cases for fine-tuning (1/3 validation)")
    parser.add_argument("--pretrain-cases", type=int, default=6, help="unlabelled cases per pre-training challenge")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of the main pre-training run")
    parser.add_argument("--mae-epochs", type=int, default=20)
    parser.add_argument("--mae-steps", type=int, default=10, help="MAE steps per epoch")
    parser.add_argument("--mae-batch", type=int, default=4, help="MAE crops per worker per step")
    parser.add_argument("--throughput-epochs", type=int, default=3, help="epochs of the 1-worker run (0: skip)")
    parser.add_argument("--model", choices=("unetr", "transunet_enc"), default="unetr", help="network fine-tuned")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (each: scratch + MAE)")
    parser.add_argument("--ft-epochs", type=int, default=6)
    parser.add_argument("--ft-steps", type=int, default=12, help="fine-tuning steps per epoch")
    parser.add_argument("--target", type=float, default=0.5, help="validation Dice (mean of WT/TC/ET) to reach")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for fine-tuning")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep everything here (default temp)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def make_data(work: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    from bratstune.data.synthetic import generate_cohort

    labelled = work / "gli-labelled"
    if not labelled.is_dir():
        generate_cohort(labelled, challenge="GLI", cases=args.cases, shape=SHAPE, seed=0, anatomy="procedural")
    unlabelled = []
    for challenge, seed in (("GLI", 1), ("MEN", 0), ("PED", 0)):
        folder = work / f"unlabelled-{challenge}"
        if not folder.is_dir():
            generate_cohort(
                folder,
                challenge=challenge,
                cases=args.pretrain_cases,
                shape=SHAPE,
                seed=seed,
                anatomy="procedural",
                start_index=1000,
            )
        unlabelled.append(folder)
    return labelled, unlabelled


def pretrain(args: argparse.Namespace, folders: list[Path], storage: Path, experiment_id: str):
    from bratstune.pretrain.run import run_mae

    config = {
        "model": {
            "img_size": [48, 48, 48],
            **VIT,
            "decoder_hidden_size": 96,
            "decoder_mlp_dim": 384,
            "decoder_num_heads": 4,
            "decoder_num_layers": 2,
        },
        "data": {"batch_size": args.mae_batch},
        "optim": {"lr": 1.5e-4 * 4},  # a small-batch CPU run needs a larger base rate to move in 200 steps
        "epochs": args.mae_epochs,
        "steps_per_epoch": args.mae_steps,
        "num_threads": 1,
    }
    t0 = time.perf_counter()
    main = run_mae(
        config,
        folders,
        workers=args.workers,
        storage_path=storage,
        name=f"mae-{args.workers}w",
        experiment_id=experiment_id,
    )
    main_s = time.perf_counter() - t0
    if args.throughput_epochs < 1:
        return main, main_s, None
    short = dict(config, epochs=args.throughput_epochs)
    single = run_mae(
        short, folders, workers=1, storage_path=storage, name="mae-1w", experiment_id=experiment_id, register_as=None
    )
    return main, main_s, single


def throughput(history: list[dict]) -> float:
    rows = history[1:] or history  # the first epoch includes warm-up
    return sum(r["throughput/samples_per_s"] for r in rows) / len(rows)


def model_section(name: str) -> dict:
    """The fine-tuned network; its ViT is the MAE encoder's (12 layers, ``VIT``)."""
    if name == "transunet_enc":
        kwargs = {"filters": [8, 16, 32, 64], "num_layers": 12, "deep_supervision": True, "deep_supr_num": 2}
        return {"name": "transunet_enc", "kwargs": {**kwargs, **VIT}}
    return {"name": "unetr", "kwargs": {"feature_size": 16, **VIT}}


def finetune(args: argparse.Namespace, data, encoder_from: str | None, out: Path, seed: int = 0):
    from bratstune.tracking.artifacts import localise_config
    from bratstune.training.fit import fit

    config = {
        "model": model_section(args.model),
        "loss": {"weights": {"dice": 1.0, "ce": 1.0}, "mode": "region"},
        "optim": {
            "name": "adamw",
            "lr": 1.0e-4 if args.model == "unetr" else 3.0e-4,  # the presets' rates
            "weight_decay": 1.0e-5,
            "schedule": "cosine",
            "warmup_fraction": 0.05,
            "grad_clip": 1.0,
        },
        "data": {"patch_size": [48, 48, 48], "batch_size": 2, "fg_prob": 0.7, "num_workers": 0},
        "validation": {"lesion_metrics": False, "overlap": 0.25, "sw_batch_size": 4},
        "init": {"encoder_from": encoder_from, "require_complete": encoder_from is not None},
        "epochs": args.ft_epochs,
        "steps_per_epoch": args.ft_steps,
        "seed": seed,
        "num_threads": args.threads,
        "challenge": "GLI",
    }
    # fit never talks to MLflow: a models:/ encoder is downloaded first (as every job does).
    config, _ = localise_config(config, dst=out / "encoder")
    t0 = time.perf_counter()
    result = fit(config, data, out_dir=out)
    return [row.get("val/dice_mean", float("nan")) for row in result.history], time.perf_counter() - t0


def first_epoch_reaching(curve: list[float], target: float) -> str:
    for epoch, value in enumerate(curve, start=1):
        if value >= target:
            return str(epoch)
    return f"not in {len(curve)}"


def steps_reaching(curve: list[float], target: float, steps: int) -> str:
    epoch = first_epoch_reaching(curve, target)
    return str(int(epoch) * steps) if epoch.isdigit() else f">{len(curve) * steps}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    tmp = tempfile.mkdtemp(prefix="bratstune-mae-bench-")
    work = args.work_dir or Path(tmp)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["BRATSTUNE_HOME"] = str(work / "home")  # throw-away MLflow store, cache and registry
    os.environ["BRATSTUNE_CACHE"] = str(work / "home" / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    ray_tmp = tempfile.mkdtemp(prefix="rmb", dir="/tmp")

    import ray

    from bratstune.data.cohort import prepare_cohort, split_train_val
    from bratstune.data.preprocess import PreprocessConfig
    from bratstune.tracking import runs as tracking

    try:
        t0 = time.perf_counter()
        labelled, unlabelled = make_data(work, args)
        prepared = prepare_cohort(labelled, PreprocessConfig())
        data = split_train_val(prepared.cases, prepared.scheme, val_fraction=1 / 3, seed=0)
        data_s = time.perf_counter() - t0
        ray.init(
            num_cpus=max(2, args.workers),
            include_dashboard=False,
            _temp_dir=ray_tmp,
            runtime_env={"py_modules": [str(PACKAGE)]},
            log_to_driver=args.verbose,
        )
        experiment_id = tracking.setup_mlflow("mae-benchmark")
        main_run, main_s, single = pretrain(args, unlabelled, work / "pretrain", experiment_id)
        ray.shutdown()
        runs = []
        for seed in args.seeds:
            scratch, scratch_s = finetune(args, data, None, work / f"ft-scratch-{seed}", seed)
            mae, mae_s = finetune(args, data, "models:/bratstune-mae-encoder@latest", work / f"ft-mae-{seed}", seed)
            runs += [(f"scratch s{seed}", scratch, scratch_s), (f"MAE s{seed}", mae, mae_s)]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)

    n_unlabelled = args.pretrain_cases * len(unlabelled)
    print(
        f"data: {len(data.train)} labelled train / {len(data.val)} val GLI cases, {n_unlabelled} unlabelled "
        f"cases (GLI/MEN/PED) for pre-training, volumes {SHAPE} ({data_s:.0f} s)"
    )
    first, last = main_run.history[0], main_run.history[-1]
    print(
        f"MAE ({VIT}, 48^3 crops, 75 % masked): {len(main_run.history)} epochs x {args.mae_steps} steps on "
        f"{args.workers} workers, effective batch {main_run.effective_batch_size}, lr x{main_run.lr_scale:g}; "
        f"loss {first['train/loss']:.3f} -> {last['train/loss']:.3f} ({main_s:.0f} s incl. Ray start)"
    )
    many = throughput(main_run.history)
    if single is not None:
        one = throughput(single.history)
        print(
            f"pre-training throughput: 1 worker {one:.1f} samples/s, {args.workers} workers {many:.1f} samples/s "
            f"(x{many / one:.2f})"
        )
    else:
        print(f"pre-training throughput: {args.workers} workers {many:.1f} samples/s")
    print(
        f"\nfine-tuning {args.model}, {args.ft_epochs} epochs x {args.ft_steps} steps, val Dice (mean WT/TC/ET) "
        "per epoch:"
    )
    print("epoch       " + " ".join(f"{e:>6d}" for e in range(1, args.ft_epochs + 1)))
    for label, curve, _ in runs:
        print(f"{label:<12}" + " ".join(f"{v:6.3f}" for v in curve))
    target = "steps to Dice " + format(args.target, ".2f")
    print(f"\n{'init':<12}{target:>22}{'final Dice':>12}{'best Dice':>11}{'time':>8}")
    for label, curve, seconds in runs:
        print(
            f"{label:<12}{steps_reaching(curve, args.target, args.ft_steps):>22}{curve[-1]:>12.3f}"
            f"{max(curve):>11.3f}{seconds:>7.0f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
