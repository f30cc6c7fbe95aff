"""The Ray Train worker of MAE pre-training: one DDP replica's training loop.

:func:`train_loop_per_worker` runs on every worker that :func:`bratstune.pretrain.run.run_mae`
starts: it builds the same MAE (same seed; DDP also broadcasts rank 0's weights), trains on its
own stream of random crops, all-reduces the loss for reporting, and (rank 0) reports resumable
checkpoints with ``ray.train.report``. See :mod:`bratstune.pretrain.run` for the whole picture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from bratstune.device import configure_threads
from bratstune.pretrain.config import load_pretrain_config
from bratstune.pretrain.data import CropSampler, load_images
from bratstune.pretrain.model import (
    MaskedAutoencoder3D,
    mae_loss,
    parameter_digest,
    patchify,
    random_noise,
    weight_decay_groups,
)

logger = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "lr_lambda", "train_loop_per_worker"]

STATE_FILE = "state.pt"


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

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def _params_in_sync(model: torch.nn.Module, device: torch.device) -> float:
    """1.0 when every worker's parameter digest is the same (all-gathered), else 0.0."""

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
            loss = mae_loss(
                pred, patchify(batch, config.model.patch_size), mask, norm_pix_loss=config.model.norm_pix_loss
            )
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
            "throughput/samples_per_s": config.effective_batch_size(world)
            * config.steps_per_epoch
            / max(elapsed, 1e-9),
            "ddp/params_in_sync": _params_in_sync(model, device),
            "ddp/world_size": float(world),
        }
        state["epoch"] = epoch
        state["history"] = list(state["history"]) + [metrics]
        if rank == 0:
            logger.info(
                "epoch %d/%d: loss %.4f, lr %.3g, %.1f s, %.2f samples/s",
                epoch,
                config.epochs,
                metrics["train/loss"],
                metrics["train/lr"],
                elapsed,
                metrics["throughput/samples_per_s"],
            )
        if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
            if rank == 0:
                staging = loop_config.get("staging_dir")
                if staging:
                    Path(staging).mkdir(parents=True, exist_ok=True)
                folder = Path(tempfile.mkdtemp(prefix="bratstune-mae-ckpt-", dir=staging))
                inner = model.module if hasattr(model, "module") else model
                _save_checkpoint(
                    folder,
                    {
                        "model": inner.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "config": config.to_dict(),
                        **state,
                    },
                    metrics,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
                shutil.rmtree(folder, ignore_errors=True)
            else:
                ray.train.report(metrics)
        else:
            ray.train.report(metrics)


# -- the driver ---------------------------------------------------------------------------------
