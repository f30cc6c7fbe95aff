"""The YAML sections that both kinds of search space share, and the Optuna sampler they choose.

A training space (:mod:`bratstune.search.space`, ``kind: train``) and a threshold space
(:mod:`bratstune.search.threshold_space`, ``kind: thresholds``) read these sections the same way::

    search: {algorithm: tpe, seed: 0, n_startup_trials: 4}    # SearchAlgSpec -> make_sampler
    data: {val_fraction: 0.25, split_seed: 0, preprocess: {}, share: cache}   # DataSpec
    data: {variants: {zscore: {}, rescale: {percentile_rescale: [1, 99]}}}   # cached before the trials

and a training space adds ``resources``, ``scheduler`` and ``failure``. Each section is a frozen
dataclass read with :func:`bratstune.config_utils.from_dict` (unknown keys get the nearest name)
and validated in ``__post_init__``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "MODES",
    "SCHEDULERS",
    "DataSpec",
    "FailureSpec",
    "ResourceSpec",
    "SchedulerSpec",
    "SearchAlgSpec",
    "make_sampler",
]

SCHEDULERS = ("asha", "fifo")
ALGORITHMS = ("tpe", "cmaes", "random")
MODES = ("max", "min")


@dataclass(frozen=True)
class ResourceSpec:
    """Per-trial resources: CPUs (also torch threads) and a fraction or number of GPUs."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if self.cpu <= 0:
            raise ConfigError(f"resources.cpu: expected > 0 (fractions allowed), got {self.cpu!r}")
        if self.gpu < 0:
            raise ConfigError(f"resources.gpu: expected >= 0 (fractions allowed), got {self.gpu!r}")

    def as_tune(self) -> dict[str, float]:
        return {"cpu": float(self.cpu), "gpu": float(self.gpu)}


@dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler: ``asha`` (early stopping) or ``fifo`` (every trial runs to the end).

    ``max_t`` (epochs; default the base config's ``epochs``), ``grace_period`` (epochs before a
    trial may be stopped) and ``reduction_factor`` (keep 1/η of the trials at each rung).
    """

    type: str = "asha"
    max_t: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        check_choice(self.type, SCHEDULERS, "scheduler.type")
        if self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period: expected >= 1, got {self.grace_period!r}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"scheduler.reduction_factor: expected > 1, got {self.reduction_factor!r}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(f"scheduler: max_t ({self.max_t}) must be >= grace_period ({self.grace_period})")


@dataclass(frozen=True)
class SearchAlgSpec:
    """Optuna sampler behind ``ray.tune.search.optuna.OptunaSearch``."""

    algorithm: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 4

    def __post_init__(self) -> None:
        check_choice(self.algorithm, ALGORITHMS, "search.algorithm")
        if self.n_startup_trials < 0:
            raise ConfigError(f"search.n_startup_trials: expected >= 0, got {self.n_startup_trials!r}")


@dataclass(frozen=True)
class FailureSpec:
    """How often a crashed trial is retried (``ray.tune.FailureConfig(max_failures=...)``)."""

    max_failures: int = 1


@dataclass(frozen=True)
class DataSpec:
    """How the cohort is split and preprocessed before the search (once, shared by all trials).

    ``variants``: named preprocessing variants (name -> ``PreprocessConfig`` keys merged over
    ``preprocess``), each cached before the first trial; a trial trains on the one its
    ``data.variant`` names (searchable: ``data.variant: {distribution: categorical, choices: [...]}``).
    """

    val_fraction: float = 0.25
    split_seed: int = 0
    preprocess: dict[str, Any] = field(default_factory=dict)
    share: str = "cache"  # "cache" (on-disk memmaps) or "object_store" (ray.put, no shared FS needed)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: expected 0 < value < 1, got {self.val_fraction!r}")
        check_choice(self.share, ("cache", "object_store"), "data.share")
        for name, overrides in self.variants.items():
            if not str(name) or not isinstance(overrides, dict):
                raise ConfigError(
                    f"data.variants.{name}: expected a mapping of preprocessing keys (e.g. {{normalize: none}}), "
                    f"got {overrides!r}"
                )
        if self.variants and self.share != "cache":
            raise ConfigError(
                "data.variants: preprocessing variants are shared through the cache; set data.share: cache"
            )


class HasSearchAlg(Protocol):
    """Any space with a ``search`` section (``SearchSpec``, ``ThresholdSpec``)."""

    search: SearchAlgSpec


def make_sampler(spec: HasSearchAlg, *, algorithm: str | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``spec.search`` (``algorithm`` overrides it, e.g. ``random``)."""
    algorithm = check_choice(algorithm or spec.search.algorithm, ALGORITHMS, "search.algorithm")
    seed = spec.search.seed
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna, and stable
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.search.n_startup_trials, multivariate=True, group=True
        )
    if algorithm == "tpe":
        return tpe
    return optuna.samplers.CmaEsSampler(
        seed=seed,
        n_startup_trials=spec.search.n_startup_trials,
        independent_sampler=tpe,
        warn_independent_sampling=False,
    )
