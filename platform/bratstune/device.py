"""Device, mixed-precision and thread settings, chosen once at the edge of a run.

* :func:`select_device`: ``auto`` → CUDA when available, else CPU.
* :func:`select_trial_device`: the device of one Ray trial or task, from its **own** GPU request
  (Ray 2.60 leaves GPUs visible to work that asked for none); a fractional share caps the
  process's CUDA memory at that fraction.
* :func:`amp_dtype`: ``auto`` → bf16 on CUDA where supported, fp16 otherwise (with a
  gradient scaler, see :func:`needs_grad_scaler`); no autocast on CPU unless ``on`` (bf16).
* :func:`configure_threads`: ``torch.set_num_threads`` (and inter-op threads when still allowed).
* :func:`hardware_summary`: what ran the job, for the tracking tags.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any

import torch

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "amp_dtype",
    "configure_threads",
    "default_num_workers",
    "hardware_summary",
    "needs_grad_scaler",
    "select_device",
    "select_trial_device",
]


def select_device(name: str = "auto") -> torch.device:
    """Resolve ``auto`` / ``cpu`` / ``cuda`` (or ``cuda:N``) to a :class:`torch.device`.

    Raises:
        ConfigError: ``cuda`` was asked for on a machine without CUDA.
    """
    if name.startswith("cuda:"):
        base = "cuda"
    else:
        base = check_choice(name, ("auto", "cpu", "cuda"), "device")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device: '{name}' was requested but torch {torch.__version__} sees no CUDA device; "
            "use device: auto or device: cpu"
        )
    return torch.device(name)


def select_trial_device(name: str = "auto", *, gpus: float) -> torch.device:
    """The device of a trial that asked its scheduler for ``gpus`` GPUs (0, a share, or whole GPUs).

    Ray 2.60 does not hide GPUs from tasks that request none (``CUDA_VISIBLE_DEVICES`` stays set),
    so ``torch.cuda.is_available()`` cannot decide: a trial without a GPU share runs on the CPU
    even on a GPU node, and Ray's accounting stays true.

    * ``gpus == 0``: CPU (``auto`` and ``cpu``); asking for ``cuda`` is a configuration error.
    * ``gpus > 0``: :func:`select_device` (``auto`` → CUDA; CPU with a warning when this process
      sees no CUDA device). A share ``0 < gpus < 1`` caps this process's CUDA memory at that
      fraction of the device (``torch.cuda.set_per_process_memory_fraction``), so four trials at
      ``gpu: 0.25`` cannot starve each other.

    Raises:
        ConfigError: a negative share, or ``device: cuda`` for a trial that asked for no GPU.
    """
    if gpus < 0:
        raise ConfigError(f"resources.gpu: expected a share >= 0, got {gpus!r}")
    if gpus == 0:
        if name.startswith("cuda"):
            raise ConfigError(
                "device: cuda, but the trial asked for no GPU (resources.gpu: 0); give it a GPU share "
                "(e.g. resources: {gpu: 0.25}) or use device: auto"
            )
        check_choice(name, ("auto", "cpu"), "device")
        return torch.device("cpu")
    if name == "auto" and not torch.cuda.is_available():
        logger.warning("the trial holds %.2f GPU but this process sees no CUDA device: running on CPU", gpus)
        return torch.device("cpu")
    device = select_device(name)
    if device.type == "cuda" and gpus < 1:
        torch.cuda.set_per_process_memory_fraction(float(gpus), device)
        logger.info("CUDA memory of this trial capped at %.0f %% of %s", 100 * gpus, device)
    return device


def amp_dtype(device: torch.device, mode: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``device`` under ``mode`` (``auto`` | ``on`` | ``off``), or ``None``.

    CUDA: bf16 where ``torch.cuda.is_bf16_supported()``, else fp16. CPU: ``auto`` keeps fp32
    (CPU autocast is rarely faster for 3-D convolutions); ``on`` uses bf16.
    """
    check_choice(mode, ("auto", "on", "off"), "amp")
    if mode == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "on" else None


def needs_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> bool:
    """fp16 on CUDA needs loss scaling; bf16 and fp32 do not."""
    return device.type == "cuda" and dtype == torch.float16


def configure_threads(num_threads: int | None) -> None:
    """Set torch's intra-op threads (and inter-op threads if torch still allows it)."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ConfigError(f"num_threads: expected an integer >= 1, got {num_threads!r}")
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(max(1, min(num_threads, 4)))
    except RuntimeError:  # only settable before the first parallel work in the process
        pass
    logger.debug("torch threads: %d intra-op, %d inter-op", torch.get_num_threads(), torch.get_num_interop_threads())


def default_num_workers() -> int:
    """Background DataLoader workers when the config says ``null``: ``min(4, cpus // 2)``, >= 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // 2))


def hardware_summary() -> dict[str, Any]:
    """CPU, memory, GPU and library facts of this machine (flat, for tracking tags)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count() or 0,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info
