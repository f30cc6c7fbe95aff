"""Threshold and post-processing search on cached validation probabilities (no retraining).

::

    spec = load_threshold_space("search_spaces/thresholds.yaml")
    model, config = load_trained_model("3f2a...", scheme)            # MLflow run id, models:/..., folder
    cases = cache_probabilities(model, val_cases, scheme, settings)  # sliding window, once
    outcome = search_thresholds(spec, cases, scheme, challenge="GLI")
    outcome.best_values    # {"thresholds.WT": 0.42, ..., "min_size.ET": 15, "fill_holes": True}

Each Optuna trial decodes the cached per-region probabilities with its thresholds
(``bratstune.labels.regions_to_labels``), applies its post-processing (per-region minimum
lesion size, hole filling; ``bratstune.inference.postprocess``) and scores the result with the BraTS
lesion-wise metrics; only the probabilities are expensive, and they are computed once.

Parameter names (``params`` of a ``kind: thresholds`` space): ``thresholds.<REGION>``
(probability threshold of a predicted region channel, e.g. WT/TC/ET), ``min_size.<REGION>``
(voxels; smaller connected components are removed), ``fill_holes`` (bool).
Metrics: ``dice_lesion_<R>``, ``dice_<R>`` (legacy), ``hd95_lesion_<R>`` and their ``_mean``.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from bratstune.config_utils import check_choice, from_dict, load_yaml, suggest
from bratstune.errors import ConfigError, DataError
from bratstune.search.space import MODES, DataSpec, ParamSpec, SearchAlgSpec, parse_param

if TYPE_CHECKING:
    import optuna
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CachedCase",
    "ThresholdOutcome",
    "ThresholdSpec",
    "apply_postprocess",
    "cache_probabilities",
    "decode",
    "evaluate",
    "load_threshold_space",
    "load_trained_model",
    "parse_threshold_space",
    "search_thresholds",
]

_PARAM = re.compile(r"^(thresholds|min_size)\.([A-Za-z]+)$|^fill_holes$")
_METRIC = re.compile(r"^(dice_lesion|dice|hd95_lesion)_([A-Za-z]+)$")
_LESION_KEYS = {"dice_lesion": "lesionwise_dice", "dice": "legacy_dice", "hd95_lesion": "lesionwise_hd95"}
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
        values: dict[str, Any] = {}
        for param in self.params:
            if param.when is not None and not param.when.holds(values):
                if param.has_otherwise:
                    values[param.name] = param.fallback(values.__getitem__)
                continue
            values[param.name] = param.sample(trial, values.__getitem__)
        return values

    def smoke_variant(self) -> ThresholdSpec:
        from dataclasses import replace

        return replace(self, num_samples=int(self.smoke.get("num_samples", 20)))


def parse_threshold_space(raw: Mapping[str, Any], *, source: Path | None = None) -> ThresholdSpec:
    """Validate a ``kind: thresholds`` mapping (see the module docstring)."""
    where = str(source or "threshold space")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, _TOP_KEYS)}; valid keys: {list(_TOP_KEYS)}")
    if raw.get("kind") != "thresholds":
        raise ConfigError(f"{where}: expected 'kind: thresholds'")
    metric = str(raw.get("metric", "dice_lesion_mean"))
    if not _METRIC.match(metric):
        raise ConfigError(f"{where}.metric: expected dice_lesion_<R>, dice_<R> or hd95_lesion_<R> (R a region or "
                          f"'mean'), got {metric!r}{suggest(metric, ['dice_lesion_mean', 'dice_mean', 'hd95_lesion_mean'])}")
    mode = check_choice(str(raw.get("mode", "min" if metric.startswith("hd95") else "max")), MODES, "mode")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise ConfigError(f"{where}.params: expected thresholds.<REGION>, min_size.<REGION> and/or fill_holes")
    params = []
    for name, entry in params_raw.items():
        if not _PARAM.match(str(name)):
            raise ConfigError(
                f"{where}.params.{name}: expected 'thresholds.<REGION>', 'min_size.<REGION>' or 'fill_holes'"
                f"{suggest(str(name), ['thresholds.WT', 'min_size.WT', 'fill_holes'])}"
            )
        param = parse_param(str(name), entry, f"{where}.params")
        low, high = param.low, param.high
        if name.startswith("thresholds.") and low is not None and not (0.0 <= low <= high <= 1.0):
            raise ConfigError(f"{where}.params.{name}: thresholds must lie in [0, 1], got {low}..{high}")
        if name.startswith("min_size.") and low is not None and low < 0:
            raise ConfigError(f"{where}.params.{name}: minimum sizes must be >= 0, got {low}")
        params.append(param)
    search = from_dict(SearchAlgSpec, raw.get("search") or {}, where=f"{where}.search")
    data = from_dict(DataSpec, raw.get("data") or {}, where=f"{where}.data")
    num_samples = int(raw.get("num_samples", 200))
    if num_samples < 1:
        raise ConfigError(f"{where}.num_samples: expected >= 1, got {num_samples}")
    return ThresholdSpec(name=str(raw.get("name") or (source.stem if source else "thresholds")), metric=metric,
                         mode=mode, num_samples=num_samples, params=tuple(params), search=search, data=data,
                         description=str(raw.get("description") or ""), smoke=dict(raw.get("smoke") or {}),
                         source=source)


def load_threshold_space(path: str | Path) -> ThresholdSpec:
    path = Path(path).resolve()
    return parse_threshold_space(load_yaml(path), source=path)


# -- probabilities, once -----------------------------------------------------------------------------


@dataclass
class CachedCase:
    """Validation probabilities of one case, kept in memory for the whole search.

    Attributes:
        probs: float16 ``(R, x, y, z)`` sigmoid per region channel (``scheme.train_regions``).
        label: uint8 reference ``(x, y, z)``.
        spacing: voxel size in mm.
    """

    case_id: str
    probs: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def cache_probabilities(model: torch.nn.Module, cases: Sequence[Any], settings: Any) -> list[CachedCase]:
    """Sliding-window probabilities of every labelled case (``bratstune.training.validate.predict_probabilities``)."""
    import torch

    from bratstune.training.validate import predict_probabilities

    if settings.mode != "region":
        raise ConfigError("threshold search needs a region-mode model (sigmoid per region); this one is label-mode")
    model.eval()
    out = []
    with torch.no_grad():
        for case in cases:
            if case.label is None:
                continue
            probs = predict_probabilities(model, case.image, settings).numpy().astype(np.float16)
            out.append(CachedCase(case.case_id, probs, np.asarray(case.label, dtype=np.uint8), tuple(case.spacing)))
    logger.info("cached probabilities of %d cases", len(out))
    return out


def load_trained_model(source: str | Path, scheme: Any, *, in_channels: int = 4) -> tuple[Any, Any]:
    """A trained network and its TrainConfig from a folder, an MLflow run id or a model URI.

    ``source`` may be a local folder holding ``config.yaml`` + weights (``fit``'s ``best/``), a
    32-hex MLflow run id or ``runs:/ID[/path]`` (its ``best_model`` artifact, as search trials and
    ``MlflowReporter`` log it), or any URI ``mlflow.artifacts.download_artifacts`` understands
    (``models:/NAME/VERSION``, ``models:/NAME@champion``) whose files include ``config.yaml``.
    """
    from bratstune.training.fit import load_network

    folder = Path(str(source))
    if not folder.is_dir():
        import mlflow

        text = str(source)
        if re.fullmatch(r"[0-9a-f]{32}", text):
            text = f"runs:/{text}/best_model"
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
        except Exception as exc:
            raise DataError(None, f"cannot fetch model {source!r}: {exc}") from exc
    found = sorted(folder.rglob("config.yaml"), key=lambda p: len(p.parts))
    if not found:
        raise DataError(folder, "no config.yaml in the model folder (expected fit's best/ folder)")
    return load_network(found[0].parent, scheme, in_channels=in_channels)


# -- one configuration ---------------------------------------------------------------------------------


def split_values(values: Mapping[str, Any], regions: Sequence[str]) -> tuple[dict[str, float], dict[str, Any]]:
    """``(thresholds per region, post-processing mapping)`` of one trial's flat values."""
    thresholds = {r: float(values.get(f"thresholds.{r}", 0.5)) for r in regions}
    min_size = {k.split(".", 1)[1]: int(v) for k, v in values.items() if k.startswith("min_size.")}
    return thresholds, {"min_size": min_size, "fill_holes": bool(values.get("fill_holes", False))}


def apply_postprocess(labels: np.ndarray, scheme: Any, config: Mapping[str, Any]) -> np.ndarray:
    """Per-region minimum lesion size and hole filling (:func:`bratstune.inference.postprocess.postprocess`)."""
    from bratstune.inference.postprocess import postprocess

    if not config.get("min_size") and not config.get("fill_holes"):
        return labels
    return postprocess(labels, scheme, dict(config))


def decode(case: CachedCase, scheme: Any, values: Mapping[str, Any]) -> np.ndarray:
    """Labels of one cached case under one trial's thresholds and post-processing."""
    from bratstune.labels import regions_to_labels

    thresholds, post = split_values(values, scheme.train_regions)
    labels = regions_to_labels(case.probs, scheme, thresholds)
    return apply_postprocess(labels, scheme, post)


def evaluate(cases: Sequence[CachedCase], scheme: Any, values: Mapping[str, Any], *, challenge: str | None,
             lesion: bool = True) -> dict[str, float]:
    """Mean metrics over ``cases``: ``dice_<R>`` always; lesion-wise ones when ``lesion`` and ``challenge``."""
    from bratstune.training.validate import region_dice

    per: dict[str, list[float]] = {}
    for case in cases:
        pred = decode(case, scheme, values)
        for region, value in region_dice(pred, case.label, scheme).items():
            per.setdefault(f"dice_{region}", []).append(value)
        if lesion and challenge:
            from bratstune.metrics import lesion_wise

            result = lesion_wise(pred, case.label, challenge, spacing=case.spacing)
            for region, row in result.items():
                if region not in scheme.regions or not isinstance(row, Mapping):
                    continue
                for short, key in _LESION_KEYS.items():
                    if short != "dice" and key in row:
                        per.setdefault(f"{short}_{region}", []).append(float(row[key]))
    out = {k: float(np.nanmean(v)) for k, v in per.items()}
    for prefix in ("dice_lesion", "dice", "hd95_lesion"):
        vals = [out[f"{prefix}_{r}"] for r in scheme.regions if f"{prefix}_{r}" in out]
        if vals:
            out[f"{prefix}_mean"] = float(np.mean(vals))
    return out


# -- the search -------------------------------------------------------------------------------------------


@dataclass
class ThresholdOutcome:
    """Result of :func:`search_thresholds`."""

    best_values: dict[str, Any]
    best_metric: float
    baseline_metric: float
    best_metrics: dict[str, float]
    trials: int
    seconds: float
    table: list[dict[str, Any]]
    study: Any = None

    @property
    def per_minute(self) -> float:
        return 60.0 * self.trials / self.seconds if self.seconds > 0 else float("inf")


def _check_regions(spec: ThresholdSpec, scheme: Any) -> None:
    for param in spec.params:
        if "." in param.name:
            kind, region = param.name.split(".", 1)
            valid = scheme.train_regions if kind == "thresholds" else tuple(scheme.regions)
            if region not in valid:
                raise ConfigError(f"{spec.source or spec.name}: params.{param.name}: scheme '{scheme.name}' has no "
                                  f"region '{region}'{suggest(region, valid)}; expected one of {list(valid)}")


def search_thresholds(spec: ThresholdSpec, cases: Sequence[CachedCase], scheme: Any, *, challenge: str | None,
                      num_samples: int | None = None, timeout_s: float | None = None) -> ThresholdOutcome:
    """Optuna search over thresholds and post-processing on cached probabilities.

    The first trial is the default (thresholds 0.5, no post-processing), so ``best_metric`` is
    never worse than ``baseline_metric``.
    """
    import optuna

    from bratstune.search.space import make_sampler

    if not cases:
        raise DataError(None, "threshold search needs at least one labelled validation case")
    _check_regions(spec, scheme)
    metric = spec.metric
    match = _METRIC.match(metric)
    if match and match.group(2) != "mean" and match.group(2) not in scheme.regions:
        raise ConfigError(f"metric {metric!r}: scheme '{scheme.name}' has no region '{match.group(2)}'")
    lesion = not metric.startswith("dice_") or metric.startswith("dice_lesion")
    if lesion and not challenge:
        raise ConfigError(f"metric {metric!r} needs the challenge (lesion-wise rules); pass challenge=")
    sampler = make_sampler(spec)  # type: ignore[arg-type]  # same fields as SearchSpec.search
    study = optuna.create_study(direction="maximize" if spec.mode == "max" else "minimize", sampler=sampler)
    baseline = {p.name: _default(p) for p in spec.params if p.distribution in ("uniform", "int", "categorical",
                                                                             "loguniform", "logint")}
    study.enqueue_trial({k: v for k, v in baseline.items() if v is not None}, skip_if_exists=True)
    table: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        values = spec.define_by_run(trial)
        metrics = evaluate(cases, scheme, values, challenge=challenge, lesion=lesion)
        value = metrics.get(metric, float("nan"))
        table.append({"trial": trial.number, **values, **metrics})
        return value if math.isfinite(value) else (-1e9 if spec.mode == "max" else 1e9)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    study.optimize(objective, n_trials=num_samples or spec.num_samples, timeout=timeout_s)
    seconds = time.perf_counter() - start
    best = study.best_trial
    best_values = dict(table[best.number])
    best_metrics = {k: v for k, v in best_values.items() if k in table[0] and k.startswith(("dice", "hd95"))}
    values = {p.name: best_values[p.name] for p in spec.params if p.name in best_values}
    base_value = table[0].get(metric, float("nan"))
    logger.info("threshold search: %d configurations in %.1f s; %s %.4f (default %.4f)", len(table), seconds,
                metric, best.value, base_value)
    return ThresholdOutcome(best_values=values, best_metric=float(best.value), baseline_metric=float(base_value),
                            best_metrics=best_metrics, trials=len(table), seconds=seconds, table=table, study=study)


def _default(param: ParamSpec) -> Any:
    """The untuned setting of a parameter: threshold 0.5, no minimum size, no hole filling."""
    if param.name.startswith("thresholds."):
        return 0.5 if param.low is not None and param.low <= 0.5 <= param.high else None
    if param.name.startswith("min_size."):
        return 0 if param.low is not None and param.low <= 0 else None
    if param.name == "fill_holes" and param.distribution == "categorical":
        return False if False in param.choices else None
    return None


def log_outcome(outcome: ThresholdOutcome, spec: ThresholdSpec, *, client: Any, experiment_id: str,
                model_source: str, parent_run_id: str | None = None, data_fingerprint: str | None = None) -> str:
    """One MLflow run with the best thresholds/post-processing, per-trial metrics, table and plots."""
    import tempfile

    import yaml
    from mlflow.entities import Metric

    from bratstune.search.results import save_plots, write_csv
    from bratstune.tracking.runs import run_tags

    extra = {"bratstune.kind": "threshold_search", "model.source": str(model_source)}
    if parent_run_id:
        extra["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(experiment_id, run_name=f"{spec.name}-thresholds",
                               tags=run_tags(data_fingerprint=data_fingerprint, extra=extra)).info.run_id
    status = "FAILED"
    try:
        for key, value in {"space": spec.name, "metric": spec.metric, "num_samples": outcome.trials,
                           "seed": spec.search.seed, "algorithm": spec.search.algorithm, "model": model_source}.items():
            client.log_param(run_id, key, str(value))
        for key, value in outcome.best_values.items():
            client.log_param(run_id, f"best.{key}", str(value))
        now = int(time.time() * 1000)
        history = [Metric(spec.metric, float(row.get(spec.metric, float("nan"))), now, int(row["trial"]))
                   for row in outcome.table if math.isfinite(float(row.get(spec.metric, float("nan"))))]
        for start in range(0, len(history), 1000):
            client.log_batch(run_id, metrics=history[start:start + 1000])
        client.log_metric(run_id, f"best/{spec.metric}", outcome.best_metric)
        client.log_metric(run_id, f"default/{spec.metric}", outcome.baseline_metric)
        client.log_metric(run_id, "configs_per_minute", outcome.per_minute)
        for key, value in outcome.best_metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, f"best/{key}", value)
        thresholds = {k.split(".", 1)[1]: v for k, v in outcome.best_values.items() if k.startswith("thresholds.")}
        post = {"min_size": {k.split(".", 1)[1]: int(v) for k, v in outcome.best_values.items()
                             if k.startswith("min_size.")}, "fill_holes": bool(outcome.best_values.get("fill_holes", False))}
        client.log_text(run_id, yaml.safe_dump({"thresholds": thresholds, "postprocess": post}, sort_keys=False),
                        "best_postprocess.yaml")
        client.log_text(run_id, write_csv(outcome.table), "results.csv")
        if outcome.study is not None:
            with tempfile.TemporaryDirectory() as tmp:
                for path in save_plots(outcome.study, Path(tmp)):
                    client.log_artifact(run_id, str(path), "plots")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return run_id


# -- the job's body ---------------------------------------------------------------------------------------


def _inference_settings(config: Any, device: str = "cpu") -> Any:
    import torch

    from bratstune.training.validate import InferenceSettings

    v = config.validation
    return InferenceSettings(roi_size=tuple(v.roi_size or config.data.patch_size), overlap=v.overlap,
                             sw_batch_size=v.sw_batch_size, blend=v.blend, mode=config.loss.mode,
                             device=torch.device(device))


def quick_model(cases: Sequence[Any], scheme: Any, out_dir: Path) -> Path:
    """Train a tiny model for one epoch (``--smoke-test`` without ``--model``); returns its best/ folder."""
    from bratstune.training.fit import TrainData, fit

    config = {"model": {"name": "unet", "kwargs": {"filters": [8, 16, 32, 64]}}, "epochs": 1, "steps_per_epoch": 3,
              "data": {"patch_size": 32, "num_workers": 0}, "validation": {"lesion_metrics": False},
              "device": "cpu", "amp": "off", "num_threads": 1}
    result = fit(config, TrainData(train=list(cases), val=list(cases)[:1], scheme=scheme), out_dir=out_dir)
    if result.best_dir is None:
        raise DataError(out_dir, "the smoke model produced no best checkpoint")
    return result.best_dir


def run_threshold_search(
    spec: ThresholdSpec,
    *,
    model: str | Path | None,
    data: str | Path,
    experiment_id: str,
    tracking_uri: str,
    num_samples: int | None = None,
    device: str = "cpu",
    workers: int = 1,
) -> tuple[ThresholdOutcome, str]:
    """Load a finished model, cache its validation probabilities once, search, log to MLflow.

    Args:
        model: folder, MLflow run id / ``runs:/`` URI, or ``models:/`` URI; ``None`` trains a
            one-epoch smoke model first.
        data: cohort folder; the validation cases are the split of ``spec.data`` (the same
            stratified split a search with the same ``data`` settings trained on).

    Returns:
        ``(outcome, mlflow_run_id)``; the run is a child of ``model``'s run when ``model`` is a run id.
    """
    import tempfile

    from mlflow.tracking import MlflowClient

    from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val

    prepared = prepare_cohort(Path(data), preprocess_config(spec.data.preprocess), workers=workers)
    split = split_train_val(prepared.cases, prepared.scheme, val_fraction=spec.data.val_fraction,
                            seed=spec.data.split_seed)
    with tempfile.TemporaryDirectory(prefix="bratstune-thresholds-") as tmp:
        source = model if model is not None else quick_model(split.train, prepared.scheme, Path(tmp) / "model")
        network, config = load_trained_model(source, prepared.scheme)
        start = time.perf_counter()
        cases = cache_probabilities(network.to(device), split.val, _inference_settings(config, device))
        logger.info("validation probabilities of %d cases in %.1f s", len(cases), time.perf_counter() - start)
    challenge = config.challenge or prepared.challenge
    outcome = search_thresholds(spec, cases, prepared.scheme, challenge=challenge, num_samples=num_samples)
    text = str(model or "smoke model")
    parent = text if re.fullmatch(r"[0-9a-f]{32}", text) else None
    run_id = log_outcome(outcome, spec, client=MlflowClient(tracking_uri), experiment_id=experiment_id,
                         model_source=text, parent_run_id=parent, data_fingerprint=prepared.fingerprint)
    return outcome, run_id
