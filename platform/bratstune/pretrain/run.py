"""MAE pre-training across workers with Ray Train (DDP), encoder export and registration.

::

    result = run_mae(PretrainConfig(), ["data/GLI", "data/PED"], workers=2,
                     storage_path="/shared/pretrain", name="mae-v1", experiment_id=exp)
    result.model_uri            # models:/bratstune-mae-encoder/3 (also ...@latest)

* The driver (:func:`run_mae`) discovers the cases of every folder (labels ignored, any
  challenge), fills the preprocessing cache once, owns the MLflow run, and starts a
  ``ray.train.torch.TorchTrainer`` with ``ScalingConfig(num_workers=N, use_gpu=...)``
  (DDP over NCCL on GPUs, gloo on CPUs).
* Each worker (:func:`bratstune.pretrain.worker.train_loop_per_worker`) builds the same MAE (same seed; DDP also
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

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import ray.train
import torch
from mlflow.entities import Metric
from ray.train.torch import TorchConfig, TorchTrainer

from bratstune import paths
from bratstune.data.fingerprint import data_fingerprint
from bratstune.errors import ConfigError
from bratstune.pretrain.config import PretrainConfig, load_pretrain_config
from bratstune.pretrain.data import collect_cases, prepare_volumes
from bratstune.pretrain.export import reconstruction_figure, register_encoder, save_encoder
from bratstune.pretrain.model import (
    MaskedAutoencoder3D,
)
from bratstune.pretrain.worker import STATE_FILE, train_loop_per_worker
from bratstune.tracking.runs import log_config, run_tags, setup_mlflow, start_run

logger = logging.getLogger(__name__)

__all__ = ["PretrainResult", "run_mae"]

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


def _run_id_for(run_dir: Path, experiment_id: str | None, name: str) -> str:
    """The MLflow run of this Ray Train run: reopened when the run folder remembers one."""

    marker = run_dir / DRIVER_DIR / RUN_ID_FILE
    if marker.is_file():
        run_id = marker.read_text().strip()
        try:
            mlflow.tracking.MlflowClient().get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - a different tracking store: start a new run
            logger.warning("MLflow run %s of %s not found in this store; starting a new run", run_id, run_dir)
    if experiment_id is None:
        experiment_id = setup_mlflow("bratstune-pretrain")
    run = mlflow.tracking.MlflowClient().create_run(
        experiment_id, run_name=name, tags=run_tags(extra={"job": "pretrain_mae"})
    )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def _log_history(run_id: str, history: Sequence[Mapping[str, float]]) -> None:

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row["epoch"]))
        for row in history
        for key, value in row.items()
        if key != "epoch" and math.isfinite(float(value))
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

    config = load_pretrain_config(config)
    if int(workers) < 1:
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
        run_id = _run_id_for(run_dir, experiment_id, name)
        mlflow.tracking.MlflowClient().set_tag(
            run_id, "data_fingerprint", data_fingerprint([c.case_id for c in cases], config.data.preprocess)
        )
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
            # checkpoints are staged inside the run folder: a killed worker leaves nothing in /tmp
            "staging_dir": str(run_dir / DRIVER_DIR / "staging"),
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
        model,
        payload,
        config=config,
        name=name,
        run_dir=run_dir,
        run_id=run_id,
        scaling=scaling,
        image=np.asarray(prepared[0].image),
        register_as=register_as,
        alias=alias,
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

    history = [dict(row) for row in payload["history"]]
    starts = [int(s) for s in payload["starts"]]
    export = run_dir / DRIVER_DIR / "export"
    encoder_path = save_encoder(model, export, run_name=name, epochs=int(payload["epoch"]), mlflow_run_id=run_id or "")
    png = export / "reconstruction.png"
    recon = reconstruction_figure(model, image, png, seed=config.seed, title=f"{name}: ")
    version = uri = None
    if run_id is not None:
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
                    export,
                    run_id=run_id,
                    name=register_as,
                    alias=alias,
                    tags={
                        "workers": scaling["workers"],
                        "effective_batch_size": scaling["effective_batch_size"],
                        "img_size": "x".join(map(str, config.model.img_size)),
                    },
                )
    return PretrainResult(
        name=name,
        run_dir=run_dir,
        history=history,
        starts=starts,
        encoder_path=encoder_path,
        reconstruction_png=png,
        run_id=run_id,
        model_version=version,
        model_uri=uri,
        workers=int(scaling["workers"]),
        effective_batch_size=int(scaling["effective_batch_size"]),
        lr_scale=float(scaling["lr_scale"]),
        lr=float(scaling["lr_effective"]),
        checkpoint_path=checkpoint_path,
        recon_metrics=recon,
    )
