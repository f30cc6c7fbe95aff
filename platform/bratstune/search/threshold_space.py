"""``kind: thresholds`` search spaces: which decode settings a threshold search tries.

::

    kind: thresholds
    name: thresholds
    metric: dice_lesion_mean          # dice_lesion_<R>, dice_<R> (legacy) or hd95_lesion_<R>; R a region or mean
    mode: max
    num_samples: 300
    search: {algorithm: tpe, seed: 0, n_startup_trials: 30}
    data: {val_fraction: 0.25, split_seed: 0}          # the validation split of the model's cohort
    params:
      thresholds.WT: {distribution: uniform, low: 0.2, high: 0.8}
      min_size.ET: {distribution: int, low: 0, high: 100, step: 5}
      fill_holes: {distribution: categorical, choices: [false, true]}
    smoke: {num_samples: 20}

Parameter names: ``thresholds.<REGION>`` (probability threshold of a predicted region channel,
e.g. WT/TC/ET), ``min_size.<REGION>`` (voxels; smaller connected components are removed),
``fill_holes`` (bool). One trial's flat values become a
:class:`~bratstune.inference.decode.DecodeSettings` (:meth:`DecodeSettings.from_values`), which is
also what checks the ranges: every edge of every distribution is probed through it here, so a
bad range fails when the file is loaded, with DecodeSettings' own message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from bratstune.config_utils import check_choice, from_dict, load_yaml, suggest
from bratstune.errors import ConfigError
from bratstune.inference.decode import DecodeSettings
from bratstune.search.params import ParamSpec, parse_param
from bratstune.search.sections import MODES, DataSpec, SearchAlgSpec

__all__ = ["METRIC", "ThresholdSpec", "load_threshold_space", "parse_threshold_space"]

_PARAM = re.compile(r"^(thresholds|min_size)\.([A-Za-z]+)$|^fill_holes$")
#: ``dice_lesion_<R>``, ``dice_<R>`` or ``hd95_lesion_<R>``: group 1 the metric, group 2 the region.
METRIC = re.compile(r"^(dice_lesion|dice|hd95_lesion)_([A-Za-z]+)$")
_TOP_KEYS = ("kind", "name", "description", "metric", "mode", "num_samples", "search", "data", "params", "smoke")


@dataclass(frozen=True)
class ThresholdSpec:
    """A validated ``kind: thresholds`` search space."""

    name: str
    metric: str
    mode: str
    num_samples: int
    params: tuple[ParamSpec, ...]
    search: SearchAlgSpec = field(default_factory=SearchAlgSpec)
    data: DataSpec = field(default_factory=DataSpec)
    description: str = ""
    smoke: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        """Optuna define-by-run function: one trial's flat values (``thresholds.WT`` ...)."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.when is not None and not param.when.holds(values):
                if param.has_otherwise:
                    values[param.name] = param.fallback(values.__getitem__)
                continue
            values[param.name] = param.sample(trial, values.__getitem__)
        return values

    def smoke_variant(self) -> ThresholdSpec:
        """The ``--smoke-test`` variant: the file's ``smoke.num_samples`` (default 20) trials."""
        return replace(self, num_samples=int(self.smoke.get("num_samples", 20)))


def _check_param(name: str, entry: Any, where: str) -> ParamSpec:
    """One ``params`` entry, its every edge probed through :class:`DecodeSettings`."""
    if not _PARAM.match(name):
        raise ConfigError(
            f"{where}.params.{name}: expected 'thresholds.<REGION>', 'min_size.<REGION>' or 'fill_holes'"
            f"{suggest(name, ['thresholds.WT', 'min_size.WT', 'fill_holes'])}"
        )
    param = parse_param(name, entry, f"{where}.params")
    regions = [name.split(".", 1)[1]] if name.startswith("thresholds.") else []
    for value in param.probe_values():
        try:
            DecodeSettings.from_values({name: value}, regions)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.params.{name} = {value!r}: {exc}") from None
    return param


def _metric(raw: Mapping[str, Any], where: str) -> str:
    metric = str(raw.get("metric", "dice_lesion_mean"))
    if not METRIC.match(metric):
        options = ["dice_lesion_mean", "dice_mean", "hd95_lesion_mean"]
        raise ConfigError(
            f"{where}.metric: expected dice_lesion_<R>, dice_<R> or hd95_lesion_<R> (R a region or "
            f"'mean'), got {metric!r}{suggest(metric, options)}"
        )
    return metric


def parse_threshold_space(raw: Mapping[str, Any], *, source: Path | None = None) -> ThresholdSpec:
    """Validate a ``kind: thresholds`` mapping (see the module docstring)."""
    where = str(source or "threshold space")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, _TOP_KEYS)}; valid keys: {list(_TOP_KEYS)}")
    if raw.get("kind") != "thresholds":
        raise ConfigError(f"{where}: expected 'kind: thresholds'")
    metric = _metric(raw, where)
    mode = check_choice(str(raw.get("mode", "min" if metric.startswith("hd95") else "max")), MODES, "mode")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise ConfigError(f"{where}.params: expected thresholds.<REGION>, min_size.<REGION> and/or fill_holes")
    params = tuple(_check_param(str(name), entry, where) for name, entry in params_raw.items())
    num_samples = int(raw.get("num_samples", 200))
    if num_samples < 1:
        raise ConfigError(f"{where}.num_samples: expected >= 1, got {num_samples}")
    return ThresholdSpec(
        name=str(raw.get("name") or (source.stem if source else "thresholds")),
        metric=metric,
        mode=mode,
        num_samples=num_samples,
        params=params,
        search=from_dict(SearchAlgSpec, raw.get("search") or {}, where=f"{where}.search"),
        data=from_dict(DataSpec, raw.get("data") or {}, where=f"{where}.data"),
        description=str(raw.get("description") or ""),
        smoke=dict(raw.get("smoke") or {}),
        source=source,
    )


def load_threshold_space(path: str | Path) -> ThresholdSpec:
    """Read and validate a ``kind: thresholds`` YAML file."""
    path = Path(path).resolve()
    return parse_threshold_space(load_yaml(path), source=path)
