"""MAE pre-training across workers with Ray Train (DDP), encoder export and registration.

::

    result = run_mae(PretrainConfig(), ["data/GLI", "data/PED"], workers=2,
                     storage_path="/shared/pretrain", name="mae-v1", experiment_id=exp)
    result.model_uri            # models:/bratstune-mae-encoder/3 (also ...@latest)

* The driver (:func:`run_mae`) discovers the cases of every folder (labels ignored, any
  challenge), fills the preprocessing cache once, owns the MLflow run, and starts a
  ``ray.train.torch.TorchTrainer`` with ``ScalingConfig(num_workers=N, use_gpu=...)``
  (DDP over NCCL on GPUs, gloo on CPUs).
* Each worker (:func:`train_loop_per_worker`) builds the same MAE (same seed; DDP also
  broadcasts rank 0's weights), wraps it with ``ray.train.torch.prepare_model``, and trains on
  its own stream of random crops; gradients are averaged by DDP every step. After every
  ``checkpoint_every`` epochs rank 0 reports a checkpoint (model, optimiser, schedule, history)
  with ``ray.train.report``; every worker reports the same metrics (all-reduced loss).
* **Resume**: Ray Train V2 restores the latest reported checkpoint of a run folder
  (``storage_path/name``) when a trainer is started again with the same ``RunConfig``; the
  loop reads it with ``ray.train.get_checkpoint()`` and continues at the next epoch (the crop
  stream and the schedule continue too). The MLflow run id is kept in the run folder, so the
  resumed driver reopens the same MLflow run.
* After ``fit`` the driver logs the per-epoch history (rank 0's), the effective batch size
  and learning-rate scaling, the encoder (``encoder/encoder.pt``), a reconstruction PNG, and
  registers the encoder (:mod:`bratstune.pretrain.export`).

``ddp/params_in_sync`` (every epoch) is 1 when every worker's parameters hash identically;
with ``param_digest_dir`` each worker also writes ``rank<r>-step<s>.json`` (parameter and
batch digests) after every step, so a test can see both workers trained on different data
and stayed identical.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bratstune.pretrain.config import PretrainConfig, load_pretrain_config
from bratstune.pretrain.model import (
    MaskedAutoencoder3D,
    mae_loss,
    parameter_digest,
    patchify,
    random_noise,
    weight_decay_groups,
)

logger = logging.getLogger(__name__)

__all__ = ["PretrainResult", "STATE_FILE", "lr_lambda", "run_mae", "train_loop_per_worker"]

STATE_FILE = "state.pt"
DRIVER_DIR = "bratstune"
RUN_ID_FILE = "mlflow_run_id"


@dataclass
class PretrainResult:
    """Outcome of :func:`run_mae`.

    Attributes:
        name: the Ray Train run name; ``run_dir`` = ``storage_path/name``.
        history: rank 0's metrics per epoch (all epochs, resumed ones included).
        starts: the epoch each (re)started worker group began after (``[0]``; ``[0, 2]`` when
            a killed run was resumed after epoch 2).
        encoder_path: exported ``encoder.pt``.
        reconstruction_png: the reconstruction picture.
        run_id: the MLflow run (``None`` without tracking).
        model_version, model_uri: the registered encoder (``None`` without registration).
        workers, effective_batch_size, lr_scale, lr: how the run was scaled.
        checkpoint_path: the last Ray Train checkpoint folder.
    """

    name: str
    run_dir: Path
    history: list[dict[str, float]]
    starts: list[int]
    encoder_path: Path
    reconstruction_png: Path
    run_id: str | None
    model_version: str | None
    model_uri: str | None
    workers: int
    effective_batch_size: int
    lr_scale: float
    lr: float
    checkpoint_path: str | None = None
    recon_metrics: dict[str, float] = field(default_factory=dict)


def lr_lambda(total_steps: int, warmup_steps: int, min_fraction: float):
    """Per-step factor: linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_fraction``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# -- the worker loop ------------------------------------------------------------------------------


def _all_reduce_mean(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _params_in_sync(model: torch.nn.Module, device: torch.device) -> float:
    """1.0 when every worker's parameter digest is the same (all-gathered), else 0.0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1.0
    mine = torch.tensor([int(parameter_digest(model)[:15], 16)], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return float(all(int(t.item()) == int(mine.item()) for t in every))


def _write_digest(folder: Path, rank: int, step: int, model: torch.nn.Module, batch: torch.Tensor, loss: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rank,
        "step": step,
        "params": parameter_digest(model),
        "batch": hashlib.sha256(batch.detach().cpu().numpy().tobytes()).hexdigest(),
        "loss": loss,
    }
    tmp = folder / f".rank{rank}-step{step:06d}.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / f"rank{rank}-step{step:06d}.json")


def _save_checkpoint(folder: Path, payload: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    torch.save(dict(payload), folder / STATE_FILE)
    (folder / "metrics.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))


def train_loop_per_worker(loop_config: Mapping[str, Any]) -> None:
    """Ray Train worker function (see the module docstring); ``loop_config`` from :func:`run_mae`."""
    import ray.train
    import ray.train.torch

    from bratstune.device import configure_threads
    from bratstune.pretrain.data import CropSampler, load_images

    config = load_pretrain_config(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    configure_threads(config.num_threads)
    device = ray.train.torch.get_device()
    digest_dir = Path(loop_config["digest_dir"]) if loop_config.get("digest_dir") else None

    torch.manual_seed(config.seed)
    model = MaskedAutoencoder3D(config.model)
    peak_lr = config.optim.lr * config.lr_scale(world)
    warmup = int(round(config.optim.warmup_fraction * config.total_steps))
    state: dict[str, Any] = {"epoch": 0, "global_step": 0, "history": [], "starts": []}
    payload = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            payload = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        state.update({k: payload[k] for k in ("epoch", "global_step", "history", "starts")})
        if rank == 0:
            logger.info("resuming MAE pre-training after epoch %d (step %d)", state["epoch"], state["global_step"])
    state["starts"] = list(state["starts"]) + [int(state["epoch"])]

    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, config.optim.weight_decay), lr=peak_lr, betas=config.optim.betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.total_steps, warmup, config.optim.min_lr_fraction)
    )
    if payload is not None:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    images = load_images(loop_config["cases"], loop_config["preprocess"], cache_root=loop_config.get("cache_root"))
    sampler = CropSampler(images, config.model.img_size, seed=config.seed, rank=rank, flip_prob=config.data.flip_prob)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = config.optim.grad_clip
    n_tokens, batch_size = config.model.num_tokens, config.data.batch_size

    for epoch in range(int(state["epoch"]) + 1, config.epochs + 1):
        model.train()
        start, losses = time.perf_counter(), []
        for step in range(config.steps_per_epoch):
            batch, rng = sampler.batch(epoch, step, batch_size)
            noise = random_noise(rng, batch_size, n_tokens)
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                pred, mask = model(batch, noise.to(device))
            loss = mae_loss(pred, patchify(batch, config.model.patch_size), mask, norm_pix_loss=config.model.norm_pix_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
            state["global_step"] += 1
            losses.append(float(loss.detach()))
            if digest_dir is not None:
                _write_digest(digest_dir, rank, int(state["global_step"]), model, batch, losses[-1])
        elapsed = time.perf_counter() - start
        metrics = {
            "epoch": float(epoch),
            "train/loss": _all_reduce_mean(float(np.mean(losses)), device),
            "train/lr": float(optimizer.param_groups[0]["lr"]),
            "time/epoch_s": elapsed,
            "throughput/samples_per_s": config.effective_batch_size(world) * config.steps_per_epoch / max(elapsed, 1e-9),
            "ddp/params_in_sync": _params_in_sync(model, device),
            "ddp/world_size": float(world),
        }
        state["epoch"] = epoch
        state["history"] = list(state["history"]) + [metrics]
        if rank == 0:
            logger.info("epoch %d/%d: loss %.4f, lr %.3g, %.1f s, %.2f samples/s", epoch, config.epochs,
                        metrics["train/loss"], metrics["train/lr"], elapsed, metrics["throughput/samples_per_s"])
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            if rank == 0:
                folder = Path(tempfile.mkdtemp(prefix="bratstune-mae-ckpt-"))
                inner = model.module if hasattr(model, "module") else model
                _save_checkpoint(folder, {
                    "model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "config": config.to_dict(), **state,
                }, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
                shutil.rmtree(folder, ignore_errors=True)
            else:
                ray.train.report(metrics)
        else:
            ray.train.report(metrics)


# -- the driver ---------------------------------------------------------------------------------


def _run_id_for(run_dir: Path, experiment_id: str | None, name: str) -> str:
    """The MLflow run of this Ray Train run: reopened when the run folder remembers one."""
    import mlflow

    from bratstune.tracking.runs import run_tags

    marker = run_dir / DRIVER_DIR / RUN_ID_FILE
    if marker.is_file():
        run_id = marker.read_text().strip()
        try:
            mlflow.tracking.MlflowClient().get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - a different tracking store: start a new run
            logger.warning("MLflow run %s of %s not found in this store; starting a new run", run_id, run_dir)
    if experiment_id is None:
        from bratstune.tracking.runs import setup_mlflow

        experiment_id = setup_mlflow("bratstune-pretrain")
    run = mlflow.tracking.MlflowClient().create_run(
        experiment_id, run_name=name, tags=run_tags(extra={"job": "pretrain_mae"})
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def _log_history(run_id: str, history: Sequence[Mapping[str, float]]) -> None:
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row["epoch"]))
        for row in history for key, value in row.items() if key != "epoch" and math.isfinite(float(value))
    ]
    client = mlflow.tracking.MlflowClient()
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def run_mae(
    config: PretrainConfig | Mapping[str, Any] | None,
    folders: Sequence[str | Path],
    *,
    workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | Path | None = None,
    name: str | None = None,
    experiment_id: str | None = None,
    track: bool = True,
    register_as: str | None = "bratstune-mae-encoder",
    alias: str | None = None,
    cache_root: Path | None = None,
    prepare_workers: int = 1,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    param_digest_dir: Path | None = None,
) -> PretrainResult:
    """Pre-train the MAE on ``folders`` with ``workers`` DDP workers (see the module docstring).

    Needs a running Ray (``ray.init`` in the caller) and, with ``track``, MLflow set up by
    :func:`bratstune.tracking.runs.setup_mlflow` in this process. Calling it again with the same
    ``storage_path`` and ``name`` resumes the run from its last checkpoint.

    Raises:
        DataError: no case in ``folders``.
        ConfigError: bad configuration.
        ray.train.TrainingFailedError: a worker failed more than ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from bratstune import paths
    from bratstune.pretrain.data import collect_cases, prepare_volumes

    config = load_pretrain_config(config)
    if int(workers) < 1:
        from bratstune.errors import ConfigError

        raise ConfigError(f"workers: expected an integer >= 1, got {workers!r}")
    name = name or time.strftime("mae-%Y%m%d-%H%M%S")
    storage = Path(storage_path) if storage_path is not None else paths.results_dir() / "pretrain"
    storage = storage.absolute()
    run_dir = storage / name
    cases = collect_cases(folders)
    prepared = prepare_volumes(cases, config.data.preprocess, cache_root=cache_root, workers=prepare_workers)
    scale = config.lr_scale(workers)
    scaling = {
        "workers": int(workers),
        "batch_size_per_worker": config.data.batch_size,
        "effective_batch_size": config.effective_batch_size(workers),
        "lr_base": config.optim.lr,
        "lr_scaling": config.optim.lr_scaling,
        "lr_scale": scale,
        "lr_effective": config.optim.lr * scale,
        "backend": "nccl" if use_gpu else "gloo",
        "use_gpu": bool(use_gpu),
        "num_cases": len(cases),
    }
    logger.info("MAE pre-training %s: %d cases, %s", name, len(cases), scaling)

    run_id = None
    if track:
        import mlflow

        from bratstune.data.fingerprint import data_fingerprint
        from bratstune.tracking.runs import log_config

        run_id = _run_id_for(run_dir, experiment_id, name)
        mlflow.tracking.MlflowClient().set_tag(run_id, "data_fingerprint",
                                               data_fingerprint([c.case_id for c in cases], config.data.preprocess))
        if not mlflow.tracking.MlflowClient().get_run(run_id).data.params:
            log_config(config.to_dict(), run_id=run_id, artifact_file="pretrain_config.yaml")
            client = mlflow.tracking.MlflowClient()
            for key, value in scaling.items():
                client.log_param(run_id, f"scaling.{key}", value)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "cases": cases,
            "preprocess": dict(config.data.preprocess),
            "cache_root": str(cache_root) if cache_root is not None else None,
            "digest_dir": str(param_digest_dir) if param_digest_dir is not None else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(workers), use_gpu=bool(use_gpu), resources_per_worker={"CPU": float(cpus_per_worker)}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=int(max_failures)),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"MAE pre-training {name} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        payload = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    model = MaskedAutoencoder3D(config.model)
    model.load_state_dict(payload["model"])
    return _finish(
        model, payload, config=config, name=name, run_dir=run_dir, run_id=run_id, scaling=scaling,
        image=np.asarray(prepared[0].image), register_as=register_as, alias=alias,
        checkpoint_path=result.checkpoint.path,
    )


def _finish(
    model: MaskedAutoencoder3D,
    payload: Mapping[str, Any],
    *,
    config: PretrainConfig,
    name: str,
    run_dir: Path,
    run_id: str | None,
    scaling: Mapping[str, Any],
    image: np.ndarray,
    register_as: str | None,
    alias: str | None,
    checkpoint_path: str | None,
) -> PretrainResult:
    """Export the encoder, draw the reconstruction, log everything to MLflow, register."""
    from bratstune.pretrain.export import reconstruction_figure, register_encoder, save_encoder

    history = [dict(row) for row in payload["history"]]
    starts = [int(s) for s in payload["starts"]]
    export = run_dir / DRIVER_DIR / "export"
    encoder_path = save_encoder(model, export, run_name=name, epochs=int(payload["epoch"]),
                                mlflow_run_id=run_id or "")
    png = export / "reconstruction.png"
    recon = reconstruction_figure(model, image, png, seed=config.seed, title=f"{name}: ")
    version = uri = None
    if run_id is not None:
        import mlflow

        from bratstune.tracking.runs import start_run

        _log_history(run_id, history)
        with start_run(run_id=run_id):
            client = mlflow.tracking.MlflowClient()
            for key, value in recon.items():
                client.log_metric(run_id, key, value)
            client.set_tag(run_id, "resumed_from_epoch", str(max(starts)))
            client.set_tag(run_id, "ray_train_run", str(run_dir))
            client.log_artifacts(run_id, str(export), "encoder")
            if register_as:
                version, uri = register_encoder(
                    export, run_id=run_id, name=register_as, alias=alias,
                    tags={"workers": scaling["workers"], "effective_batch_size": scaling["effective_batch_size"],
                          "img_size": "x".join(map(str, config.model.img_size))},
                )
    return PretrainResult(
        name=name, run_dir=run_dir, history=history, starts=starts, encoder_path=encoder_path,
        reconstruction_png=png, run_id=run_id, model_version=version, model_uri=uri,
        workers=int(scaling["workers"]), effective_batch_size=int(scaling["effective_batch_size"]),
        lr_scale=float(scaling["lr_scale"]), lr=float(scaling["lr_effective"]),
        checkpoint_path=checkpoint_path, recon_metrics=recon,
    )
