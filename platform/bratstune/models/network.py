"""What rebuilds a trained network: its spec (read from the saved train config), the network, its weights.

A trained network is described by the training config saved with its weights (fit's
``best/config.yaml``, each member of ``ensemble.json``). Rebuilding it needs a few keys only::

    model: {name: unet, kwargs: {...}}          architecture and its options
    loss: {mode: region}                        output channels: one per region, or background + labels
    data: {patch_size: [P, P, P], preprocess: {...}}
    validation: {roi_size: null}                sliding window (null = the patch size)

:class:`NetworkSpec` reads them from the plain mapping (the training loop and its config classes
are not imported), :func:`build_network` builds the untrained network and
:func:`load_model_weights` fills it from ``model.pt`` / ``state.pt`` (``torch.load(weights_only=True)``)
or a ``.safetensors`` file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bratstune.config_utils import check_choice, to_triple
from bratstune.errors import ConfigError, DataError
from bratstune.models.factory import build_model

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "NetworkSpec",
    "build_network",
    "load_model_weights",
    "output_channels",
]

MODEL_FILE = "model.pt"  # a best-model folder's state dict
STATE_FILE = "state.pt"  # a training checkpoint (its "model" entry is the state dict)
_MODES = ("region", "label")


def _section(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"trained model config: '{key}' must be a mapping, got {value!r}")
    return value


def _required(section: Mapping[str, Any], key: str, where: str) -> Any:
    value = section.get(key)
    if value is None:
        raise ConfigError(
            f"trained model config: missing '{where}'; expected the resolved training config that fit saves "
            "(best/config.yaml)"
        )
    return value


@dataclass(frozen=True)
class NetworkSpec:
    """The part of a saved training config that rebuilds and runs its network.

    Attributes:
        name: architecture (``model.name``).
        kwargs: architecture options (``model.kwargs``, completed with ``patch_size``).
        mode: ``region`` (sigmoid per region) or ``label`` (softmax) (``loss.mode``).
        patch_size: training patch ``(P, P, P)`` (``data.patch_size``).
        roi_size: validation window (``validation.roi_size``); ``None`` = the patch size.
        preprocess: ``data.preprocess`` (the mapping of ``PreprocessConfig``).
    """

    name: str
    kwargs: Mapping[str, Any]
    mode: str
    patch_size: tuple[int, int, int]
    roi_size: tuple[int, int, int] | None = None
    preprocess: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NetworkSpec:
        """Read the spec from a saved training config (a plain mapping, as ``TrainConfig.to_dict()`` gives).

        Raises:
            ConfigError: a missing key or a bad value.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"trained model config: expected a mapping, got {type(config).__name__}")
        model, loss = _section(config, "model"), _section(config, "loss")
        data, validation = _section(config, "data"), _section(config, "validation")
        patch_size = to_triple(_required(data, "patch_size", "data.patch_size"), "data.patch_size")
        roi = validation.get("roi_size")
        kwargs = dict(model.get("kwargs") or {})
        kwargs.setdefault("patch_size", list(patch_size))
        return cls(
            name=str(_required(model, "name", "model.name")),
            kwargs=kwargs,
            mode=check_choice(str(_required(loss, "mode", "loss.mode")), _MODES, "loss.mode"),
            patch_size=patch_size,
            roi_size=to_triple(roi, "validation.roi_size") if roi is not None else None,
            preprocess=dict(data.get("preprocess") or {}),
        )

    @property
    def window(self) -> tuple[int, int, int]:
        """The sliding-window size: ``roi_size``, else the training patch size."""
        return self.roi_size or self.patch_size


def output_channels(mode: str, scheme: Any) -> int:
    """Region mode: one channel per ``scheme.train_regions``; label mode: background + labels."""
    check_choice(mode, _MODES, "loss.mode")
    if mode == "region":
        return len(scheme.train_regions)
    return 1 + len(scheme.labels)


def build_network(spec: NetworkSpec, scheme: Any, *, in_channels: int = 4) -> torch.nn.Module:
    """The (untrained) network of ``spec`` for ``scheme``."""
    return build_model(spec.name, in_channels, output_channels(spec.mode, scheme), **dict(spec.kwargs))


def load_model_weights(model: torch.nn.Module, path: Path | str, *, map_location: torch.device | str = "cpu") -> None:
    """Load weights from a best-model folder, a ``model.pt``, a training checkpoint or a ``.safetensors`` file.

    Raises:
        DataError: no weights there, or weights that do not fit ``model``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE if (path / MODEL_FILE).is_file() else path / STATE_FILE
    if not path.is_file():
        raise DataError(path, f"no model weights here (expected {MODEL_FILE} or {STATE_FILE})")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device=str(torch.device(map_location)))
    else:
        state = torch.load(path, map_location=map_location, weights_only=True)
        if path.name == STATE_FILE:
            state = state["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(path, f"weights do not fit the network ({exc})") from None
