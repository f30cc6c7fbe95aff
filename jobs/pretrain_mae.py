"""MAE pre-training of the UNETR encoder on unlabelled volumes, across workers with Ray Train.

    python jobs/pretrain_mae.py --smoke-test                              # tiny CPU run, 2 gloo workers
    python jobs/pretrain_mae.py --data /data/GLI /data/PED --workers 4 --gpu --name mae-v1
    python jobs/pretrain_mae.py --data /data/GLI --name mae-v1            # again: resumes mae-v1
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pretrain_mae.py --workers 2

Every folder given to ``--data`` is searched for cases (any BraTS naming, any challenge; labels
ignored). Without ``--data`` a synthetic cohort is generated. The run persists under
``--storage-path``/``--name`` (default ``.bratstune/results/pretrain``): starting the job again
with the same name resumes from the last per-epoch checkpoint. Metrics, the encoder and a
reconstruction PNG go to MLflow (``$MLFLOW_TRACKING_URI`` or ``.bratstune/mlflow.db``); the encoder
is registered as ``bratstune-mae-encoder`` (use it with ``init.encoder_from:
models:/bratstune-mae-encoder@latest``). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import _bootstrap
from bratstune import paths
from bratstune.config_utils import apply_overrides, load_yaml
from bratstune.data.synthetic import generate_cohort
from bratstune.pretrain.run import PretrainResult, run_mae

SMOKE = {
    "model": {
        "img_size": [32, 32, 32],
        "hidden_size": 48,
        "mlp_dim": 96,
        "num_heads": 3,
        "decoder_hidden_size": 48,
        "decoder_mlp_dim": 96,
        "decoder_num_heads": 3,
        "decoder_num_layers": 1,
    },
    "data": {"batch_size": 2},
    "epochs": 2,
    "steps_per_epoch": 2,
    "num_threads": 1,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="*", default=None, help="cohort folders (default: synthetic cohort)")
    parser.add_argument("--config", type=Path, default=None, help="pre-training YAML (bratstune.pretrain.config)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set epochs=50 (repeatable)",
    )
    parser.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU model, 2 epochs x 2 steps")
    parser.add_argument("--name", default=None, help="run name (default mae-<timestamp>); an existing name resumes")
    parser.add_argument("--storage-path", default=None, help="Ray Train storage (default .bratstune/results/pretrain)")
    parser.add_argument("--address", default=None, help="Ray address (default $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")
    parser.add_argument("--ray-temp-dir", default=None, help="temp dir of a locally started Ray (keep it short)")
    parser.add_argument("--experiment", default="bratstune-pretrain", help="MLflow experiment name")
    parser.add_argument("--register-as", default="bratstune-mae-encoder", help="registered model name ('' = none)")
    parser.add_argument("--alias", default=None, help="extra registry alias for the new version (latest is built in)")
    parser.add_argument("--max-failures", type=int, default=0, help="worker-group restarts Ray Train may do")
    parser.add_argument("--synthetic-cases", type=int, default=None, help="size of the generated cohort")
    parser.add_argument(
        "--param-digest-dir",
        type=Path,
        default=None,
        help="each worker writes parameter/batch digests after every step here (DDP check)",
    )
    return parser


def _synthetic(cases: int, smoke: bool) -> list[Path]:
    shape = (32, 32, 32) if smoke else (64, 64, 48)
    out = paths.data_dir() / f"synthetic-mae-GLI-{cases}-{'x'.join(map(str, shape))}"
    if not (out / ".complete").is_file():
        generate_cohort(out, challenge="GLI", cases=cases, shape=shape, seed=0, anatomy="procedural")
        (out / ".complete").write_text("ok\n")
    return [out]


def summary(result: PretrainResult) -> None:
    """Print the run and, last, its JSON summary (what scripts and tests read)."""
    last = result.history[-1] if result.history else {}
    print(
        f"MAE {result.name}: {len(result.history)} epochs on {result.workers} worker(s), effective batch "
        f"{result.effective_batch_size}, lr {result.lr:.3g} (x{result.lr_scale:g}); final loss "
        f"{last.get('train/loss', float('nan')):.4f}, {last.get('throughput/samples_per_s', float('nan')):.2f} samples/s"
    )
    print(f"encoder: {result.encoder_path}" + (f"; registered {result.model_uri}" if result.model_uri else ""))
    print(
        json.dumps(
            {
                "name": result.name,
                "run_dir": str(result.run_dir),
                "run_id": result.run_id,
                "starts": result.starts,
                "epochs": len(result.history),
                "encoder": str(result.encoder_path),
                "model_uri": result.model_uri,
                "model_version": result.model_version,
                "reconstruction": str(result.reconstruction_png),
                "effective_batch_size": result.effective_batch_size,
                "lr_scale": result.lr_scale,
                "history": result.history,
            }
        )
    )


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    mapping = dict(SMOKE) if args.smoke_test else {}
    if args.config is not None:
        mapping.update(load_yaml(args.config))
    mapping = apply_overrides(mapping, args.overrides)
    folders = args.data or _synthetic(args.synthetic_cases or (4 if args.smoke_test else 16), args.smoke_test)
    with _bootstrap.session(
        experiment=args.experiment, address=args.address, num_cpus=args.num_cpus, _temp_dir=args.ray_temp_dir
    ) as session:
        result = run_mae(
            mapping,
            folders,
            workers=args.workers,
            use_gpu=args.gpu,
            storage_path=args.storage_path,
            name=args.name,
            experiment_id=session.experiment_id,
            register_as=args.register_as or None,
            alias=args.alias,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
            param_digest_dir=args.param_digest_dir,
        )
    summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
