"""A Tune trainable that reports the device a trial chooses, on a simulated GPU node.

The node is ``ray.init(num_gpus=1)`` with ``CUDA_VISIBLE_DEVICES=0`` on a machine without CUDA, so
inside the trial torch's view of CUDA is stood in for: ``torch.cuda.is_available()`` answers True
(as on a GPU node, where Ray 2.60 leaves the GPU visible even to trials that asked for none) and
``torch.cuda.set_per_process_memory_fraction`` records the cap instead of applying it. The device
itself comes from :func:`bratstune.search.trial.trial_device`, what ``run_trial`` calls. Shipped to
the workers by value (tests/ is not importable there).
"""

from __future__ import annotations

import os


def report_device(config):
    import ray
    import torch
    from ray import tune

    from bratstune.search.trial import trial_device

    caps = []
    torch.cuda.is_available = lambda: True
    torch.cuda.set_per_process_memory_fraction = lambda fraction, device=None: caps.append(float(fraction))
    device = trial_device(config.get("device", "auto"))
    tune.report(
        {
            "asked": float(config["gpu"]),
            "share": float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)),
            "device": device.type,
            "memory_cap": caps[-1] if caps else -1.0,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        }
    )
