"""One trained network of an ensemble: its saved training config, its spec, the network, its metrics.

A member keeps the training config it was trained with as the plain mapping that was saved
(fit's ``best/config.yaml``, a member of ``ensemble.json``), plus the
:class:`~bratstune.models.network.NetworkSpec` read from it: everything prediction needs, with
nothing of the training loop imported. Code that needs the typed config calls
``bratstune.training.config.load_train_config(member.config)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bratstune.config_utils import load_yaml
from bratstune.errors import ConfigError, DataError
from bratstune.inference.sliding_window import InferenceConfig
from bratstune.models.network import NetworkSpec, build_network, load_model_weights

__all__ = ["Member"]


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in dict(metrics).items() if isinstance(v, (int, float))}


@dataclass
class Member:
    """One trained network of the ensemble.

    Attributes:
        name: short identifier (fold name, trial id, folder name).
        config: the resolved training config it was trained with, as the saved mapping (an object
            with ``to_dict()``, such as a ``TrainConfig``, is converted).
        model: the network (CPU, eval mode).
        metrics: its validation metrics (``val/...``), if known.
        spec: what rebuilds and runs the network (read from ``config``).
    """

    name: str
    config: Mapping[str, Any]
    model: torch.nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    spec: NetworkSpec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, Mapping):
            to_dict = getattr(self.config, "to_dict", None)
            if to_dict is None:
                raise ConfigError(
                    f"ensemble member {self.name!r}: expected the training config as a mapping, "
                    f"got {type(self.config).__name__}"
                )
            self.config = to_dict()
        self.config = dict(self.config)
        self.spec = NetworkSpec.from_config(self.config)

    @classmethod
    def from_folder(cls, folder: Path | str, scheme: Any, *, in_channels: int = 4, name: str | None = None) -> Member:
        """A ``fit`` best-model folder (``model.pt`` + ``config.yaml`` + ``metrics.json``)."""
        folder = Path(folder)
        if not (folder / "config.yaml").is_file():
            raise DataError(folder, "not a trained model folder (expected config.yaml and model.pt, as fit's best/)")
        config = load_yaml(folder / "config.yaml")
        model = build_network(NetworkSpec.from_config(config), scheme, in_channels=in_channels)
        load_model_weights(model, folder)
        metrics = {}
        if (folder / "metrics.json").is_file():
            metrics = _numbers(json.loads((folder / "metrics.json").read_text()))
        return cls(name or folder.name, config, model.cpu().eval(), metrics)

    @classmethod
    def from_fit(cls, result: Any, *, name: str) -> Member:
        """A :class:`bratstune.training.fit.FitResult` (its model holds the best weights)."""
        return cls(name, result.config, result.model.cpu().eval(), _numbers(result.best_metrics))

    def roi_size(self, inference: InferenceConfig) -> tuple[int, int, int]:
        """The member's sliding window: ``inference.roi_size``, else its validation window or patch size."""
        if inference.roi_size is not None:
            return tuple(inference.roi_size)  # type: ignore[return-value]
        return self.spec.window
