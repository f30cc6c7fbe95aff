"""What a cross-validation does (:class:`CrossValSpec`) and which training config it cross-validates.

A spec is data, read like a search space or a training config (YAML or the job's flags, unknown
keys answered with the nearest valid one)::

    folds: 5                      # k (2 <= k <= labelled cases)
    seed: 0                       # fold assignment (and the gate and inner splits)
    splits: null                  # nnU-Net splits_final.json: entry i is fold i (its val = held-out cases)
    selection: inner              # each fold's epoch: inner (chosen on an inner validation split of
                                  #   the fold's own training cases) | fixed (all `epochs`, last weights)
    inner_val_fraction: 0.2       # share of a fold's training cases that choose its epoch (inner)
    gate_fraction: 0.2            # cases kept out of the whole CV for the promotion gate (0: none)
    gate_cases: null              # a JSON file listing the gate case ids instead (list, or {"gate": [...]})
    gate_data: null               # or a separate labelled folder as the gate split (the whole cohort is CV'd)
    gate: {}                      # the promotion gate (bratstune.ensemble.promotion.GateSpec: metric, margin ...)
    epochs: null                  # override the config's epochs
    threshold_trials: 100         # decode-tuning trials per search (k cross-fitted + 1 deployed)
    threshold_space: null         # a kind: thresholds YAML (default DEFAULT_THRESHOLD_SPACE)
    resources: {cpu: 1, gpu: 0}   # per fold trial (num_threads follows cpu)
    smoke: false                  # shrink the config to a seconds-long CPU run
    name: null                    # output / Tune experiment name (default cv-<timestamp>)
    storage_path: null            # parent folder of the output (default .bratstune/results/cv)
    register: null                # register the ensemble as this model name
    promote: false                # ... and move @champion if it wins the gate
    force: false                  # ... or regardless
    experiment: bratstune-cv      # MLflow experiment
    workers: 1                    # processes preprocessing the cohort
    search_run_id: null           # lineage: the search the config comes from
    inference: {}                 # the ensemble's InferenceConfig (default TTA flips, overlap 0.5)

Which cases do what (:mod:`~bratstune.search.crossval.folds`): the gate cases are drawn first and
never touched by the CV; the remaining cases are cut into k folds; fold i trains on the other
folds' cases, picks its epoch on an inner split of those (``selection: inner``) or on nothing
(``fixed``), and predicts its held-out cases, whose decode settings are then tuned on the other
folds' out-of-fold probabilities (cross-fitting, :mod:`~bratstune.search.crossval.decode_tuning`).

The training config comes separately: a YAML file, a preset or a search's ``best_config.yaml``
(:func:`resolve_config`), adjusted by the spec (:func:`training_config`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import yaml

from bratstune.config_utils import apply_overrides, check_choice, from_dict, load_yaml
from bratstune.ensemble.promotion import GateSpec
from bratstune.errors import ConfigError, DataError
from bratstune.presets import load_preset
from bratstune.search.sections import ResourceSpec
from bratstune.training.config import TrainConfig, load_train_config

__all__ = [
    "DEFAULT_THRESHOLD_SPACE",
    "SELECTIONS",
    "SMOKE_OVERRIDES",
    "CrossValSpec",
    "config_from_search",
    "load_crossval_spec",
    "resolve_config",
    "smoke_config",
    "training_config",
]

#: Used when no threshold space is given (the same as ``search_spaces/thresholds.yaml``).
DEFAULT_THRESHOLD_SPACE: dict[str, Any] = {
    "kind": "thresholds",
    "name": "cv-thresholds",
    "metric": "dice_lesion_mean",
    "mode": "max",
    "num_samples": 100,
    "search": {"algorithm": "tpe", "seed": 0, "n_startup_trials": 20},
    "params": {
        "thresholds.WT": {"distribution": "uniform", "low": 0.2, "high": 0.9},
        "thresholds.TC": {"distribution": "uniform", "low": 0.2, "high": 0.9},
        "thresholds.ET": {"distribution": "uniform", "low": 0.2, "high": 0.9},
        "min_size.WT": {"distribution": "logint", "low": 1, "high": 4000},
        "min_size.TC": {"distribution": "logint", "low": 1, "high": 2000},
        "min_size.ET": {"distribution": "logint", "low": 1, "high": 500},
        "fill_holes": {"distribution": "categorical", "choices": [False, True]},
    },
}

#: How a fold picks its epoch: on an inner split of its training cases, or not at all.
SELECTIONS = ("inner", "fixed")

#: What ``smoke: true`` writes over the config: a tiny, fast CPU run.
SMOKE_OVERRIDES: dict[str, Any] = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supervision": False}},
    # target_spacing null: the cohort's own grid (a smoke cohort is coarse; resampling it to the
    # presets' 2 mm would multiply its voxels)
    "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0, "preprocess": {"target_spacing": None}},
    "validation": {"lesion_metrics": False, "overlap": 0.25},
    "epochs": 1,
    "steps_per_epoch": 3,
    "device": "cpu",
    "amp": "off",
}


@dataclass(frozen=True)
class CrossValSpec:
    """A validated cross-validation spec (see the module docstring for every key)."""

    folds: int = 5
    seed: int = 0
    splits: str | Path | None = None
    selection: str = "inner"
    inner_val_fraction: float = 0.2
    gate_fraction: float = 0.2
    gate_cases: str | Path | None = None
    gate_data: str | Path | None = None
    gate: GateSpec = field(default_factory=GateSpec)
    epochs: int | None = None
    threshold_trials: int = 100
    threshold_space: str | Path | None = None
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    smoke: bool = False
    name: str | None = None
    storage_path: str | Path | None = None
    register: str | None = None
    promote: bool = False
    force: bool = False
    experiment: str = "bratstune-cv"
    workers: int = 1
    search_run_id: str | None = None
    inference: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"folds: expected k >= 2 folds, got {self.folds!r}")
        if self.threshold_trials < 1:
            raise ConfigError(f"threshold_trials: expected >= 1, got {self.threshold_trials!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs: expected >= 1 (or null: the config's epochs), got {self.epochs!r}")
        if self.workers < 1:
            raise ConfigError(f"workers: expected >= 1, got {self.workers!r}")
        check_choice(self.selection, SELECTIONS, "selection")
        if not 0.0 < self.inner_val_fraction < 1.0:
            raise ConfigError(f"inner_val_fraction: expected 0 < value < 1, got {self.inner_val_fraction!r}")
        if not 0.0 <= self.gate_fraction < 1.0:
            raise ConfigError(f"gate_fraction: expected 0 <= value < 1 (0: no gate split), got {self.gate_fraction!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, *, where: str = "cross-validation spec") -> CrossValSpec:
        """Validate a mapping (YAML, or the job's flags); unknown keys get the nearest valid name."""
        return from_dict(cls, mapping, where=where)


def load_crossval_spec(path: str | Path) -> CrossValSpec:
    """Read and validate a cross-validation spec YAML file."""
    path = Path(path).resolve()
    return CrossValSpec.from_mapping(load_yaml(path), where=str(path))


# -- the training config ----------------------------------------------------------------------------


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def smoke_config(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``config`` shrunk to a seconds-long CPU run (:data:`SMOKE_OVERRIDES`)."""
    plain = load_train_config(config).to_dict()
    return _merge(plain, SMOKE_OVERRIDES)


def training_config(config: TrainConfig | Mapping[str, Any], spec: CrossValSpec) -> TrainConfig:
    """The config every fold trains: ``config`` with the spec's ``smoke`` and ``epochs`` applied.

    Raises:
        ConfigError: a label-mode config (decode tuning needs per-region sigmoid outputs).
    """
    plain = load_train_config(config).to_dict()
    if spec.smoke:
        plain = smoke_config(plain)
    if spec.epochs is not None:
        plain["epochs"] = int(spec.epochs)
    train_config = load_train_config(plain)
    if train_config.loss.mode != "region":
        raise ConfigError(
            "cross-validation tunes per-region thresholds on out-of-fold probabilities: it needs "
            f"loss.mode: region (got {train_config.loss.mode!r})"
        )
    return train_config


def config_from_search(run_id: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """The ``best_config.yaml`` artifact of a search's parent run (``bratstune.search.results``)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="best_config.yaml")
    except Exception as exc:  # MLflow raises several types for unknown runs / artifacts
        raise DataError(
            None,
            f"--from-search {run_id}: cannot fetch best_config.yaml of that run ({exc}); "
            "give the search's parent run id (the run holding best_config.yaml)",
        ) from None
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise DataError(Path(path), "best_config.yaml is not a mapping")
    return data


def resolve_config(
    *,
    config: str | Path | None = None,
    preset: str | None = None,
    from_search: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The training config of a job: exactly one of a YAML file, a preset name, a search run id."""
    given = [x for x in (config, preset, from_search) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --config FILE.yaml, --preset NAME, --from-search RUN_ID")
    if config:
        data = load_yaml(Path(config))
    elif preset:
        data = load_preset(preset)
    else:
        data = config_from_search(str(from_search))
    data = apply_overrides(dict(data), list(overrides)) if overrides else dict(data)
    load_train_config(data)  # validate now, not in k trials
    return data
