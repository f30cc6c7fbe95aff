"""Resumable training checkpoints and best-model folders.

A training checkpoint is a folder (what Ray Tune's ``Checkpoint.from_directory`` wants)::

    <dir>/state.pt        model, optimiser, scheduler, grad scaler, epoch, global step,
                          best metric/epoch, RNG states (torch, CUDA, numpy, random)
    <dir>/config.yaml     the resolved TrainConfig
    <dir>/metrics.json    the metrics of the epoch it was written after
    <dir>/best/           a copy of the best-model folder at that time (if any), so the
                          checkpoint alone restores the run (a Ray Tune checkpoint is only this folder)

The best model folder holds ``model.pt`` (the state dict only), ``config.yaml`` and
``metrics.json``. Everything loads with ``torch.load(weights_only=True)``: RNG states are
stored as tensors and plain Python values, never pickled objects.

Folders are written whole under a hidden name unique to the writer
(``.<name>.<pid>-<uuid>.tmp``) and then swapped in by two renames (the old folder to
``.<name>.<pid>-<uuid>.old``, the new one into place); no fixed ``.tmp``/``.old`` name is ever
shared by two writers. A crash between the renames leaves both complete folders under their
hidden names: :func:`recover_dir` (run by every reader and writer of the folder) puts the new
one in place, or the old one when the new one is not there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bratstune.errors import DataError
from bratstune.models.network import MODEL_FILE, STATE_FILE

logger = logging.getLogger(__name__)

__all__ = [
    "STATE_FILE",
    "MODEL_FILE",
    "TrainState",
    "capture_rng",
    "load_state",
    "recover_dir",
    "restore_best",
    "restore_rng",
    "save_best",
    "save_state",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
BEST_DIR = "best"


@dataclass
class TrainState:
    """What a resumed run needs besides the config.

    Attributes:
        epoch: epochs completed (the resumed run starts at this epoch index).
        global_step: optimisation steps completed.
        best_metric: best value of the selection metric so far, or ``None``.
        best_epoch: the epoch (1-based) that produced it, or ``None``.
        history: per-epoch metric dicts so far.
    """

    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    """Snapshot of the torch, CUDA, numpy and ``random`` generators (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "random": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore the generators from :func:`capture_rng`'s snapshot."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    py = state["random"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_sidecars(folder: Path, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(dict(config), sort_keys=False))
    (folder / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))


def _temp_dir(final: Path) -> Path:
    """A fresh, empty hidden folder next to ``final``, named for this writer only."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    return tmp


def _siblings(final: Path, kind: str) -> dict[str, Path]:
    """``{token: path}`` of the hidden ``.<name>.<token>.<kind>`` folders next to ``final``."""
    prefix, suffix = f".{final.name}.", f".{kind}"
    out = {}
    if final.parent.is_dir():
        for path in final.parent.iterdir():
            if path.name.startswith(prefix) and path.name.endswith(suffix):
                out[path.name[len(prefix) : -len(suffix)]] = path
    return out


def _writer_alive(token: str) -> bool:
    try:
        os.kill(int(token.split("-", 1)[0]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def recover_dir(final: Path) -> None:
    """Finish or undo a replacement of ``final`` that a crash cut short.

    ``final`` missing while a writer's ``.old`` exists means the crash fell between the two
    renames of :func:`_replace_dir`: that writer's ``.tmp`` is complete (it is renamed only once
    written), so it takes the place; without it, the ``.old`` folder goes back. Hidden folders
    left by writers that are no longer running are removed.
    """
    final = Path(final)
    olds, tmps = _siblings(final, "old"), _siblings(final, "tmp")
    if not final.exists():
        for token, old in sorted(olds.items(), key=lambda item: item[1].stat().st_mtime, reverse=True):
            if not _writer_alive(token):
                os.replace(tmps.pop(token) if token in tmps else old, final)
                logger.warning("recovered %s after an interrupted replacement", final)
                break
    for token, path in [*_siblings(final, "old").items(), *_siblings(final, "tmp").items()]:
        if not _writer_alive(token):
            shutil.rmtree(path, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written ``tmp`` folder (from :func:`_temp_dir`) to ``final``, replacing it.

    An error (not a crash) between the two renames puts the old folder back at once.
    """
    if not final.exists():
        os.replace(tmp, final)
        return
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _writing(final: Path) -> Iterator[Path]:
    """A temp folder to fill; swapped in for ``final`` on success, removed on an error."""
    tmp = _temp_dir(final)
    try:
        yield tmp
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def save_state(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: TrainState,
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
    best_dir: Path | None = None,
) -> Path:
    """Write a resumable checkpoint folder atomically (temp folder + rename); return it.

    ``best_dir`` (the best-model folder so far) is copied into ``<folder>/best``.
    """
    folder = Path(folder)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "rng": capture_rng(),
    }
    with _writing(folder) as tmp:
        torch.save(payload, tmp / STATE_FILE)
        _write_sidecars(tmp, config, metrics)
        if best_dir is not None and Path(best_dir).is_dir():
            shutil.copytree(best_dir, tmp / BEST_DIR)
    return folder


def restore_best(checkpoint: Path, target: Path) -> Path | None:
    """Put the best-model copy of a checkpoint folder at ``target``; ``None`` if it has none."""
    source = Path(checkpoint)
    source = (source if source.is_dir() else source.parent) / BEST_DIR
    if not source.is_dir():
        return None
    with _writing(Path(target)) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return Path(target)


def resolve_state_file(path: Path) -> Path:
    """Accept a checkpoint folder or its ``state.pt``; raise :class:`DataError` otherwise."""
    path = Path(path)
    recover_dir(path if path.name != STATE_FILE else path.parent)
    candidate = path / STATE_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(path, f"no training checkpoint here (expected a folder holding {STATE_FILE})")
    return candidate


def load_state(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    map_location: torch.device | str = "cpu",
) -> TrainState:
    """Load a checkpoint from :func:`save_state` into the given objects (and the RNGs)."""
    payload = torch.load(resolve_state_file(path), map_location=map_location, weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    restore_rng(payload["rng"])
    return TrainState(
        epoch=int(payload["epoch"]),
        global_step=int(payload["global_step"]),
        best_metric=payload.get("best_metric"),
        best_epoch=payload.get("best_epoch"),
        history=list(payload.get("history") or []),
    )


def save_best(folder: Path, *, model: torch.nn.Module, config: Mapping[str, Any], metrics: Mapping[str, float]) -> Path:
    """Write the best-model folder (``model.pt`` state dict + config + metrics) atomically."""
    folder = Path(folder)
    with _writing(folder) as tmp:
        torch.save(model.state_dict(), tmp / MODEL_FILE)
        _write_sidecars(tmp, config, metrics)
    return folder
