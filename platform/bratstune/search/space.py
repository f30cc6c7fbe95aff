"""Search spaces as YAML: load, validate, and turn into an Optuna define-by-run function.

A search-space file (``search_spaces/*.yaml``) declares *what* a search optimises and *how*::

    name: losses
    metric: val/dice_lesion_mean   # a metric fit() reports each epoch (this one is the default);
    mode: max                      # or a list: [val/dice_lesion_mean, val/hd95_lesion_mean], [max, min]
    protocol: brats2023            # lesion-wise rules of the objective (brats2023 | brats2026)
    num_samples: 8                 # trials
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}    # per trial; gpu may be fractional (0.25 = four trials per GPU)
    scheduler: {type: asha, max_t: 12, grace_period: 2, reduction_factor: 2}   # or {type: fifo}
    search: {algorithm: tpe, seed: 0, n_startup_trials: 4}                    # tpe | cmaes | random
    failure: {max_failures: 1}     # retries of a crashed trial
    base:                          # the training config every trial perturbs
      preset: unet                 # optional: a bundled preset (or a YAML path) under the keys below
      epochs: 12
    smoke: {num_samples: 2, base: {epochs: 2}}   # what --smoke-test changes (merged on the defaults)
    params:                        # dotted TrainConfig paths, sampled in this order
      loss.weights.dice:  {distribution: uniform, low: 0.0, high: 2.0}
      loss.weights.focal: {distribution: loguniform, low: 0.01, high: 5.0}
      loss.weights.focal_tversky: {distribution: categorical, choices: [0.0, 1.0]}
      loss.alpha: {distribution: uniform, low: 0.1, high: 0.9, when: "loss.weights.focal_tversky > 0"}
      _constraint: {distribution: categorical, choices: [free, one_minus_alpha]}   # "_": search-only
      loss.beta: {distribution: uniform, low: 0.1, high: 0.9,
                  when: "_constraint == free", otherwise: "1 - loss.alpha"}

Distributions (:data:`bratstune.search.params.DISTRIBUTIONS`): ``uniform``/``loguniform`` (``low``, ``high``, optional
``step`` for ``uniform``), ``int``/``logint`` (``low``, ``high``, optional ``step``), ``categorical``
(``choices``: a list, or a mapping label → value for values Optuna cannot store such as lists),
``constant`` (``value``) and ``derived`` (``expr``: arithmetic over earlier parameters and the
base config, e.g. ``1 - loss.alpha``).

``when`` (``NAME OP VALUE`` with ``OP`` in ``> >= < <= == != in``) makes a parameter conditional
on earlier ones; when false the parameter is not sampled and the base config keeps its value,
unless ``otherwise`` gives a constant or an expression. The loader checks every key against the
schema (nearest-name suggestions), every parameter path against :class:`TrainConfig` (loss-term
names and weights included: :class:`~bratstune.training.config.LossConfig` is their one validator),
and every reference against the parameters defined before it. The shared sections (``search``,
``data``, ``resources``, ``scheduler``, ``failure``) and the sampler live in
:mod:`bratstune.search.sections`.

Objectives: by default a search maximises the challenge's lesion-wise Dice
(``val/dice_lesion_mean``, brats2023 rules) after the default dust removal
(:data:`bratstune.inference.decode.DEFAULT_POSTPROCESS`), because that is what BraTS ranks; the
base config's ``validation.metric`` (which picks each trial's best checkpoint) follows the first
objective, and ``base.validation.postprocess: {}`` scores raw predictions. Voxel Dice
(``val/dice_mean``) stays available. Several objectives (``metric`` and ``mode`` as lists) make a
multi-objective search: Optuna's multi-objective TPE through ``OptunaSearch``, with the FIFO
scheduler (ASHA stops trials on one metric), and a Pareto front on the parent run
(:mod:`bratstune.search.pareto`). Where the other sections live:
:mod:`bratstune.search.sections`; ``kind: thresholds`` files in :mod:`bratstune.search.threshold_space`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from bratstune.config_utils import check_choice, from_dict, load_yaml, suggest
from bratstune.data.preprocess import PreprocessConfig
from bratstune.errors import ConfigError
from bratstune.inference.decode import DEFAULT_POSTPROCESS
from bratstune.models import ARCHITECTURES, architecture_options
from bratstune.presets import load_preset
from bratstune.search.params import META_PREFIX, ParamSpec, apply_values, deep_merge, get_path, parse_param
from bratstune.search.sections import (
    MODES,
    DataSpec,
    FailureSpec,
    ResourceSpec,
    SchedulerSpec,
    SearchAlgSpec,
)
from bratstune.search.threshold_space import ThresholdSpec, parse_threshold_space
from bratstune.training.config import TrainConfig, load_train_config

__all__ = [
    "KINDS",
    "SMOKE_DEFAULTS",
    "SearchSpec",
    "load_search_space",
    "load_space_file",
    "parse_spec",
]

#: What ``--smoke-test`` changes when the file's ``smoke`` section says nothing else: a few
#: tiny CPU trials (2 epochs of 2 steps on 32³ patches, validation on 2 cases).
SMOKE_DEFAULTS: dict[str, Any] = {
    "num_samples": 2,
    "max_concurrent_trials": 2,
    "resources": {"cpu": 1, "gpu": 0},
    "scheduler": {"max_t": 2, "grace_period": 1},
    "base": {
        "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0, "preprocess": {"target_spacing": None}},
        "validation": {"overlap": 0.0, "max_cases": 2},
        "epochs": 2,
        "steps_per_epoch": 2,
        "device": "cpu",
        "amp": "off",
    },
}


# -- the spec ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpec:
    """A validated search space (see the module docstring for the YAML)."""

    name: str
    metric: str
    mode: str
    num_samples: int
    params: tuple[ParamSpec, ...]
    base: dict[str, Any]
    max_concurrent_trials: int = 2
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchAlgSpec = field(default_factory=SearchAlgSpec)
    failure: FailureSpec = field(default_factory=FailureSpec)
    data: DataSpec = field(default_factory=DataSpec)
    description: str = ""
    smoke: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    # -- derived views

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """``(metric, mode)`` of every objective; the first is :attr:`metric` / :attr:`mode`."""
        return tuple(zip(self.metrics, self.modes)) or ((self.metric, self.mode),)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def base_config(self) -> TrainConfig:
        return load_train_config(self.base)

    @property
    def max_t(self) -> int:
        """Epochs of the longest trial (the scheduler's ``max_t``, at most the base ``epochs``)."""
        epochs = int(self.base_config().epochs)
        return min(self.scheduler.max_t or epochs, epochs)

    def lookup(self, values: Mapping[str, Any]) -> Callable[[str], Any]:
        """Name resolver for expressions: sampled values first, then the base config."""

        def find(name: str) -> Any:
            if name in values:
                return values[name]
            found = get_path(self.base, name)
            if found is None:
                found = get_path(self.base_config().to_dict(), name)
            if found is None:
                raise ConfigError(f"search space {self.name}: '{name}' is neither a parameter nor set in base")
            return found

        return find

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        """Optuna define-by-run function: samples every parameter in order, honouring ``when``.

        Returns the complete flat ``{dotted name: value}`` mapping (choices resolved to their
        values, derived and constant parameters included); Ray's ``OptunaSearch`` merges it over
        the sampled values, so it becomes the trial's config.
        """
        values: dict[str, Any] = {}
        for param in self.params:
            lookup = self.lookup(values)
            if param.when is not None and not param.when.holds(values):
                if param.has_otherwise:
                    values[param.name] = param.fallback(lookup)
                continue
            values[param.name] = param.sample(trial, lookup)
        return values

    def train_config(self, values: Mapping[str, Any]) -> TrainConfig:
        """The validated :class:`TrainConfig` of one trial's values."""
        return load_train_config(apply_values(self.base, values))

    def config_dict(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return self.train_config(values).to_dict()

    def resolved(self) -> dict[str, Any]:
        """Plain mapping of everything the search uses (logged as ``resolved_space.yaml``)."""
        return {
            "name": self.name,
            "description": self.description,
            "metric": [m for m, _ in self.objectives] if self.multi_objective else self.metric,
            "mode": [m for _, m in self.objectives] if self.multi_objective else self.mode,
            "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials,
            "resources": self.resources.as_tune(),
            "scheduler": {**self.scheduler.__dict__, "max_t": self.max_t},
            "search": dict(self.search.__dict__),
            "failure": dict(self.failure.__dict__),
            "data": dict(self.data.__dict__),
            "params": {p.name: p.describe() for p in self.params},
            "base": self.base_config().to_dict(),
            "source": str(self.source) if self.source else None,
        }

    def with_changes(self, **changes: Any) -> SearchSpec:
        """A copy with top-level fields replaced (``num_samples=8``, ``base=...``)."""
        return replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any], label: str) -> SearchSpec:
        """A re-validated copy with ``overrides`` merged in (top-level keys and ``base``)."""
        return _variant(self, overrides, label)

    def smoke_variant(self) -> SearchSpec:
        """The tiny CPU-only variant ``--smoke-test`` runs (``SMOKE_DEFAULTS`` + the file's ``smoke``)."""
        return _variant(self, deep_merge(SMOKE_DEFAULTS, self.smoke), "smoke")


def _variant(spec: SearchSpec, overrides: Mapping[str, Any], label: str) -> SearchSpec:
    raw = deep_merge(spec.raw, {k: v for k, v in overrides.items() if k != "base"})
    raw["base"] = deep_merge(spec.base, overrides.get("base", {}))
    raw.pop("smoke", None)
    return parse_spec(raw, source=spec.source, where=f"{spec.source or spec.name} ({label})")


KINDS = ("train", "thresholds")
_TOP_KEYS = (
    "kind",
    "name",
    "description",
    "metric",
    "mode",
    "protocol",
    "num_samples",
    "max_concurrent_trials",
    "resources",
    "scheduler",
    "search",
    "failure",
    "data",
    "base",
    "params",
    "smoke",
)


def _load_base(raw: Any, where: str, source: Path | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.base: expected a TrainConfig mapping, got {raw!r}")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    candidate = Path(str(preset))
    if source is not None and not candidate.is_absolute():
        candidate = source.parent / candidate
    if str(preset).endswith((".yaml", ".yml")):
        base = load_yaml(candidate)
    else:
        base = load_preset(str(preset))
    return deep_merge(base, raw)


def _section(cls: type, raw: Mapping[str, Any], key: str, where: str) -> Any:
    value = raw.get(key)
    if value is None:
        return cls()
    return from_dict(cls, value, where=f"{where}.{key}")


def _check_params(params: Sequence[ParamSpec], base: dict[str, Any], where: str) -> None:
    seen: list[str] = []
    for p in params:
        if p.name in seen:
            raise ConfigError(f"{where}.params: '{p.name}' is defined twice")
        for ref in p.references:
            if ref in seen:
                continue
            if ref.startswith(META_PREFIX) or ref in [q.name for q in params]:
                raise ConfigError(
                    f"{where}.params.{p.name}: refers to '{ref}', which must be defined before it{suggest(ref, seen)}"
                )
            if get_path(base, ref) is None and get_path(load_train_config(base).to_dict(), ref) is None:
                raise ConfigError(
                    f"{where}.params.{p.name}: '{ref}' is not a parameter defined before it nor a base-config key"
                    f"{suggest(ref, seen)}"
                )
        seen.append(p.name)
        if p.is_meta:
            continue
        parts = p.name.split(".")
        if parts[:2] == ["data", "preprocess"]:
            raise ConfigError(
                f"{where}.params.{p.name}: preprocessing is prepared once before the search and shared by all "
                "trials; set it under data.preprocess of the space instead of searching it"
            )
        if parts[:2] == ["model", "kwargs"] and len(parts) >= 3:
            known = sorted({k for arch in ARCHITECTURES for k in architecture_options(arch)})
            if parts[2] not in known:
                raise ConfigError(
                    f"{where}.params.{p.name}: no architecture has an option '{parts[2]}'{suggest(parts[2], known)}"
                )
        for value in p.probe_values():
            try:
                load_train_config(apply_values(base, {p.name: value}))
            except ConfigError as exc:
                raise ConfigError(f"{where}.params.{p.name} = {value!r}: {exc}") from None


def _check_variants(spec: SearchSpec, base: TrainConfig, where: str) -> None:
    """``data.variants`` are valid preprocessing configs; ``data.variant`` (base or searched) names one."""
    common = {**dict(base.data.preprocess), **dict(spec.data.preprocess)}
    for name, overrides in spec.data.variants.items():
        from_dict(PreprocessConfig, {**common, **overrides}, where=f"{where}.data.variants.{name}")
    names = sorted(spec.data.variants)
    if base.data.variant is not None and base.data.variant not in names:
        raise ConfigError(f"{where}.base.data.variant: {base.data.variant!r} is not one of data.variants {names}")
    for param in spec.params:
        if param.name == "data.variant":
            for value in param.probe_values():
                if value not in names:
                    raise ConfigError(f"{where}.params.data.variant: {value!r} is not one of data.variants {names}")


def _check_top(raw: Mapping[str, Any], where: str) -> None:
    """``kind: train`` (the default), known top-level keys, ``metric`` and ``params`` present."""
    kind = check_choice(str(raw.get("kind", "train")), KINDS, "kind")
    if kind != "train":
        raise ConfigError(
            f"{where}: kind '{kind}' is a threshold search over cached probabilities; load it with "
            "bratstune.search.threshold_space.load_threshold_space (jobs/search_thresholds.py)"
        )
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, _TOP_KEYS)}; valid keys: {list(_TOP_KEYS)}")
    if "params" not in raw:
        raise ConfigError(f"{where}: missing 'params'")


def _positive(raw: Mapping[str, Any], key: str, default: int, where: str) -> int:
    given = raw.get(key, default)
    if (
        isinstance(given, bool)
        or not isinstance(given, (int, float))
        or not math.isfinite(given)
        or given != int(given)
    ):
        raise ConfigError(f"{where}.{key}: expected a whole number >= 1, got {given!r}")
    value = int(given)
    if value < 1:
        raise ConfigError(f"{where}.{key}: expected >= 1, got {value}")
    return value


#: The objective of a search whose file names none: BraTS ranks by lesion-wise Dice.
DEFAULT_METRIC = "val/dice_lesion_mean"


def _objectives(raw: Mapping[str, Any], where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``metric`` / ``mode`` (a name or a list of names) as two tuples of equal length."""
    metric = raw.get("metric", DEFAULT_METRIC)
    metrics = tuple(str(m) for m in (metric if isinstance(metric, (list, tuple)) else [metric]))
    mode = raw.get("mode", "max")
    modes = tuple(str(m) for m in (mode if isinstance(mode, (list, tuple)) else [mode] * len(metrics)))
    if not metrics or len(set(metrics)) != len(metrics):
        raise ConfigError(f"{where}.metric: expected one metric name or a list of distinct names, got {metric!r}")
    if len(modes) != len(metrics):
        raise ConfigError(f"{where}.mode: expected one mode per metric ({len(metrics)}), got {mode!r}")
    for name in metrics:
        if not name.startswith(("val/", "train/")):
            raise ConfigError(
                f"{where}.metric: expected a reported metric such as 'val/dice_lesion_mean', got {name!r}"
            )
    for value in modes:
        check_choice(value, MODES, f"{where}.mode")
    if len(metrics) > 1:
        scheduler = (raw.get("scheduler") or {}).get("type", "fifo")
        if scheduler != "fifo":
            raise ConfigError(
                f"{where}.scheduler.type: a multi-objective search needs 'fifo' (ASHA stops trials on one "
                f"metric), got {scheduler!r}"
            )
        if (raw.get("search") or {}).get("algorithm", "tpe") == "cmaes":
            raise ConfigError(f"{where}.search.algorithm: CMA-ES is single-objective; use tpe or random")
    return metrics, modes


def _objective_defaults(base: dict[str, Any], metric: str, mode: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The base config scores what the search optimises: its first objective picks each trial's
    best checkpoint, under the space's ``protocol``, after the default dust removal unless
    ``base.validation.postprocess`` says otherwise."""
    validation = dict(base.get("validation") or {})
    if metric.startswith("val/"):
        validation.setdefault("metric", metric)
        validation.setdefault("metric_mode", mode)
    if "protocol" in raw:
        validation["protocol"] = raw["protocol"]
    validation.setdefault("postprocess", DEFAULT_POSTPROCESS)
    return {**base, "validation": validation}


def _scheduler_section(raw: Mapping[str, Any], where: str, *, multi_objective: bool) -> SchedulerSpec:
    """The ``scheduler`` section; a multi-objective search defaults to FIFO."""
    scheduler = _section(SchedulerSpec, raw, "scheduler", where)
    if multi_objective and "type" not in (raw.get("scheduler") or {}):
        scheduler = replace(scheduler, type="fifo")
    return scheduler


def parse_spec(raw: Mapping[str, Any], *, source: Path | None = None, where: str | None = None) -> SearchSpec:
    """Validate a search-space mapping (what :func:`load_search_space` reads from YAML)."""
    where = where or str(source or "search space")
    raw = dict(raw)
    _check_top(raw, where)
    metrics, modes = _objectives(raw, where)
    num_samples = _positive(raw, "num_samples", 8, where)
    concurrent = _positive(raw, "max_concurrent_trials", 2, where)
    base = _objective_defaults(_load_base(raw.get("base"), where, source), metrics[0], modes[0], raw)
    try:
        base_cfg = load_train_config(base)
    except ConfigError as exc:
        raise ConfigError(f"{where}.base: {exc}") from None
    params_raw = raw["params"]
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise ConfigError(f"{where}.params: expected a non-empty mapping of dotted config paths to distributions")
    params = tuple(parse_param(str(k), v, f"{where}.params") for k, v in params_raw.items())
    _check_params(params, base, where)
    smoke = raw.get("smoke") or {}
    if not isinstance(smoke, Mapping):
        raise ConfigError(f"{where}.smoke: expected a mapping, got {smoke!r}")
    spec = SearchSpec(
        name=str(raw.get("name") or (source.stem if source else "search")),
        metric=metrics[0],
        mode=modes[0],
        metrics=metrics,
        modes=modes,
        num_samples=num_samples,
        params=params,
        base=base,
        max_concurrent_trials=concurrent,
        resources=_section(ResourceSpec, raw, "resources", where),
        scheduler=_scheduler_section(raw, where, multi_objective=len(metrics) > 1),
        search=_section(SearchAlgSpec, raw, "search", where),
        failure=_section(FailureSpec, raw, "failure", where),
        data=_section(DataSpec, raw, "data", where),
        description=str(raw.get("description") or ""),
        smoke=dict(smoke),
        source=source,
        raw=dict(raw),
    )
    _check_variants(spec, base_cfg, where)
    if spec.scheduler.max_t is not None and spec.scheduler.max_t > base_cfg.epochs:
        raise ConfigError(
            f"{where}.scheduler.max_t ({spec.scheduler.max_t}) exceeds base epochs ({base_cfg.epochs}); "
            "lower max_t or raise base.epochs"
        )
    return spec


def load_search_space(path: str | Path) -> SearchSpec:
    """Read and validate a search-space YAML file.

    Raises:
        ConfigError: naming the file, the key and the fix (nearest valid name where one exists).
    """
    path = Path(path).resolve()
    return parse_spec(load_yaml(path), source=path, where=str(path))


def load_space_file(path: str | Path) -> SearchSpec | ThresholdSpec:
    """Load any file of ``search_spaces/``: a :class:`SearchSpec` (``kind: train``, the default)
    or a :class:`~bratstune.search.threshold_space.ThresholdSpec` (``kind: thresholds``)."""
    path = Path(path).resolve()
    raw = load_yaml(path)
    if str(raw.get("kind", "train")) == "thresholds":
        return parse_threshold_space(raw, source=path)
    return parse_spec(raw, source=path, where=str(path))
