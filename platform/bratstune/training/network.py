"""The network of a :class:`~bratstune.training.config.TrainConfig`: build, initialise, reload.

Rebuilding a trained network is :mod:`bratstune.models.network`'s job (it reads the saved config
as a plain mapping, so prediction never imports training); this module applies it to the typed
config that ``fit`` works with:

* :func:`resolve_config` completes ``model.kwargs`` with the training ``patch_size``, so the
  saved config rebuilds exactly the trained network.
* :func:`build_network`: ``bratstune.models.build_model(name, in_channels, out_channels, **kwargs)``
  with ``out_channels`` from the loss mode and the label scheme (:func:`output_channels`).
* :func:`prepare_network`: build + ``init.encoder_from`` weights + ``freeze`` groups.
* :func:`load_network`: rebuild a trained network from a best-model or checkpoint folder.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bratstune.config_utils import load_yaml
from bratstune.models import network as models_network
from bratstune.models.encoder_init import load_encoder_weights
from bratstune.models.freeze import freeze
from bratstune.models.network import NetworkSpec, load_model_weights
from bratstune.training.config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)

__all__ = ["build_network", "load_init_weights", "load_network", "output_channels", "prepare_network", "resolve_config"]


def output_channels(config: TrainConfig, scheme: Any) -> int:
    """Region mode: one channel per ``scheme.train_regions``; label mode: background + labels."""
    return models_network.output_channels(config.loss.mode, scheme)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Complete ``model.kwargs`` with the training ``patch_size`` (so the network can be rebuilt)."""
    kwargs = dict(config.model.kwargs)
    kwargs.setdefault("patch_size", list(config.data.patch_size))
    return replace(config, model=replace(config.model, kwargs=kwargs))


def build_network(config: TrainConfig, scheme: Any, *, in_channels: int = 4) -> torch.nn.Module:
    """The (untrained) network of ``config`` for ``scheme``."""
    spec = NetworkSpec.from_config(resolve_config(config).to_dict())
    return models_network.build_network(spec, scheme, in_channels=in_channels)


def load_init_weights(model: torch.nn.Module, path: Path | str, *, strip_prefix: str = "") -> int:
    """Load every tensor of ``path`` whose (prefix-stripped) name and shape match ``model``.

    Thin wrapper over :func:`bratstune.models.encoder_init.load_encoder_weights` (which
    interpolates position embeddings and returns a full report). Returns the number of tensors
    initialised.

    Raises:
        DataError: missing file, or no tensor matches.
    """
    report = load_encoder_weights(model, path, strip_prefix=strip_prefix)
    return len(report.initialised)


def prepare_network(config: TrainConfig, scheme: Any, *, in_channels: int = 4) -> torch.nn.Module:
    """Build the network, load ``init.encoder_from`` and freeze the ``freeze`` groups.

    With ``init.encoder_from`` the :class:`~bratstune.models.encoder_init.EncoderInitReport` (which
    tensors were loaded, interpolated, mismatched, missing) is logged and attached to the
    returned model as ``model.bratstune_init_report``.
    """
    model = build_network(config, scheme, in_channels=in_channels)
    if config.init.encoder_from is not None:
        report = load_encoder_weights(
            model,
            config.init.encoder_from,
            strip_prefix=config.init.strip_prefix,
            interpolate=config.init.interpolate_pos_embed,
            require_complete=config.init.require_complete,
        )
        model.bratstune_init_report = report  # type: ignore[assignment]
    if config.freeze:
        freeze(model, list(config.freeze))
    return model


def load_network(folder: Path, scheme: Any, *, in_channels: int = 4) -> tuple[torch.nn.Module, TrainConfig]:
    """Rebuild a trained network (eval mode, CPU) from a best-model or checkpoint folder."""
    config = load_train_config(load_yaml(Path(folder) / "config.yaml"))
    model = build_network(config, scheme, in_channels=in_channels)
    load_model_weights(model, Path(folder))
    return model.eval(), config
