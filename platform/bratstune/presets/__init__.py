"""Ready-made training configurations (package data ``bratstune/presets/*.yaml``).

One preset per architecture (``unet``, ``resunet``, ``attention_unet``, ``unetr``,
``swin_unetr``, ``segresnet``) and published BraTS loss/optimiser settings
(``focal_tversky_ce``, ``dice_focal_edge``, ``mse_ce_edge``). Each file is a
:class:`bratstune.training.config.TrainConfig` mapping; its first comment line describes it.
Nothing is read at import time.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError

__all__ = ["describe_preset", "list_presets", "load_preset", "preset_text"]

_SUFFIX = ".yaml"


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    root = resources.files(__name__)
    return sorted(p.name[: -len(_SUFFIX)] for p in root.iterdir() if p.name.endswith(_SUFFIX))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name`` (``ConfigError`` with a suggestion if unknown)."""
    names = list_presets()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'{suggest(name, names)}; available: {names}")
    return resources.files(__name__).joinpath(name + _SUFFIX).read_text(encoding="utf-8")


def load_preset(name: str) -> dict[str, Any]:
    """Preset ``name`` as a plain mapping (validate it with ``load_train_config``)."""
    data = yaml.safe_load(preset_text(name))
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{name}': expected a mapping at the top level")
    return data


def describe_preset(name: str) -> str:
    """The preset's first comment line (without ``#``), or ``""``."""
    for line in preset_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""
