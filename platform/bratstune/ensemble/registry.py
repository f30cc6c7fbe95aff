"""MLflow packaging, registration and promotion of ensembles.

* :class:`EnsembleModel`: the MLflow ``pyfunc`` wrapper. Its only artifact is the ensemble
  folder of :meth:`bratstune.ensemble.package.Ensemble.save` (safetensors weights + JSON + SHA-256
  manifest, checked when the model loads); the ``bratstune`` package travels as ``code_paths``,
  so ``mlflow.pyfunc.load_model("models:/bratstune-gli@champion")`` works in a fresh process.
* :func:`register_ensemble`: log the pyfunc model in the active run and register a new version of
  ``name`` (one registered model per challenge, :func:`default_model_name`), tagged with lineage
  (``lineage.*``), metrics (``metric.<name>``), the selection metric and the package digest.
* :func:`promote`: move the alias ``champion`` to a version only when it beats the current
  champion on the recorded validation metric (strictly; ``mode`` max or min), or when
  ``force=True`` (tagged ``promotion.forced=true`` and logged as a warning); the replaced champion
  gets the alias ``previous``. Every decision is tagged on the candidate version.
* :func:`load_ensemble`: an ensemble from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
  ``runs:/RUN/ensemble``, an MLflow model folder or an ensemble folder.
* :func:`list_models`: rows for ``bratstune models list``.

Pyfunc input (``model.predict``): a raw image ``numpy`` array ``(C, X, Y, Z)`` in the model's
modality order returns uint8 labels ``(X, Y, Z)`` (``model.unwrap_python_model()
.predict_probabilities(image)``: the float32 probabilities on the input grid); a ``pandas.DataFrame`` with one column per
modality (file paths) and optionally ``output`` (a ``.nii.gz`` to write) returns one row per case
with the output path and region volumes.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc

from bratstune.errors import BratstuneError, ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "CHAMPION",
    "PREVIOUS",
    "EnsembleModel",
    "LoadedEnsemble",
    "Promotion",
    "default_model_name",
    "list_models",
    "load_ensemble",
    "promote",
    "register_ensemble",
    "resolve_member_source",
]

CHAMPION = "champion"
PREVIOUS = "previous"
MODEL_NAME = "ensemble"  # the logged model's name inside its run
ARTIFACT_KEY = "ensemble"
REQUIREMENTS = ("torch", "monai", "numpy", "nibabel", "safetensors", "scipy", "connected-components-3d", "pyyaml",
                "mlflow", "pandas")


class PromotionError(BratstuneError):
    """The promotion gate cannot decide (no recorded metric, unknown version ...)."""


# -- pyfunc ---------------------------------------------------------------------------------------


# No type hints on ``predict``: MLflow would build an input schema from them, which neither a raw
# volume array nor a table of file paths fits (MLflow logs a harmless warning about it).
class EnsembleModel(mlflow.pyfunc.PythonModel):
    """``pyfunc`` wrapper around :class:`bratstune.ensemble.package.Ensemble` (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from bratstune.ensemble.package import Ensemble

        self.ensemble = Ensemble.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        import numpy as np

        if isinstance(model_input, np.ndarray):
            return self._predict_array(model_input, probabilities=False)
        return self._predict_frame(model_input)

    def predict_probabilities(self, image: Any) -> Any:
        """Float32 mean probabilities ``(K, X, Y, Z)`` of a raw image ``(C, X, Y, Z)`` on its own grid.

        Reach it through ``mlflow.pyfunc.load_model(uri).unwrap_python_model()``.
        """
        return self._predict_array(image, probabilities=True)

    def _predict_array(self, image: Any, *, probabilities: bool) -> Any:
        import numpy as np

        from bratstune.data.preprocess import preprocess_arrays
        from bratstune.inference.sliding_window import probabilities_on_grid

        ens = self.ensemble
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4 or image.shape[0] != len(ens.modalities):
            raise DataError(None, f"expected a raw image of shape ({len(ens.modalities)}, X, Y, Z) with channels "
                            f"{', '.join(ens.modalities)}, got {image.shape}")
        crop, _, bbox = preprocess_arrays(image, None, ens.preprocess, reference=ens.reference)
        grid = probabilities_on_grid(ens.probabilities(crop), bbox, image.shape[1:], mode=ens.mode)
        return grid if probabilities else ens.decode(grid)

    def _predict_frame(self, frame: Any) -> Any:
        import pandas as pd

        from bratstune.data.layout import Case
        from bratstune.data.nifti import load_case, write_nifti_atomic
        from bratstune.predict.report import region_stats

        ens = self.ensemble
        missing = [m for m in ens.modalities if m not in frame.columns]
        if missing:
            raise DataError(None, f"input table lacks column(s) {missing}; expected one file path per modality "
                            f"{list(ens.modalities)} and optionally 'case_id', 'output'")
        rows = []
        for i, row in frame.reset_index(drop=True).iterrows():
            case_id = str(row["case_id"]) if "case_id" in frame.columns else f"case-{i}"
            case = Case(case_id, {m: Path(row[m]) for m in ens.modalities}, None, "table", ens.challenge)
            data = load_case(case)
            seg = ens.segment(data)
            out = row.get("output") if "output" in frame.columns else None
            if out:
                write_nifti_atomic(out, seg.labels, data.affine, data.header)
            rows.append({"case_id": case_id, "output": out, **region_stats(seg.labels, ens.scheme, data.spacing)})
        return pd.DataFrame(rows)


# -- registration -----------------------------------------------------------------------------------


def default_model_name(challenge: str | None) -> str:
    """``bratstune-<challenge>`` (lower case), e.g. ``bratstune-gli``."""
    return f"bratstune-{(challenge or 'gli').lower()}"


def _requirements() -> list[str]:
    from bratstune.tracking.runs import package_versions

    versions = package_versions(REQUIREMENTS)
    return [f"{name}=={versions[name]}" if name in versions else name for name in REQUIREMENTS]


def register_ensemble(
    ensemble: Any,
    *,
    name: str,
    metric: str,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> Any:
    """Log ``ensemble`` as a pyfunc model in the active MLflow run and register a new version.

    Args:
        ensemble: a :class:`bratstune.ensemble.package.Ensemble`.
        name: registered model name (one per challenge, e.g. ``bratstune-gli``).
        metric: the validation metric promotion compares (must be in ``ensemble.metrics``).
        tags: extra version tags.
        description: version description.

    Returns:
        The ``ModelVersion`` (``str(.version)`` is the new version number).

    Raises:
        ConfigError: ``metric`` not recorded in ``ensemble.metrics``, or no active run.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    import bratstune

    if metric not in ensemble.metrics or not math.isfinite(float(ensemble.metrics[metric])):
        raise ConfigError(f"the ensemble has no finite value for {metric!r} (recorded: {sorted(ensemble.metrics)}); "
                          "promotion needs the validation metric it compares")
    run = mlflow.active_run()
    if run is None:
        raise ConfigError("register_ensemble needs an active MLflow run (use bratstune.tracking.runs.start_run)")
    with tempfile.TemporaryDirectory(prefix="bratstune-ensemble-") as tmp:
        folder = ensemble.save(Path(tmp) / "ensemble")
        code = Path(tmp) / "code" / "bratstune"
        shutil.copytree(Path(bratstune.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=EnsembleModel(),
            artifacts={ARTIFACT_KEY: str(folder)},
            code_paths=[str(code)],
            pip_requirements=_requirements(),
            registered_model_name=name,
            metadata={"bratstune_ensemble_digest": ensemble.digest},
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    version_tags: dict[str, Any] = {
        "selection.metric": metric,
        "ensemble.digest": ensemble.digest,
        "ensemble.members": len(ensemble.members),
        "ensemble.scheme": ensemble.scheme.name,
        "ensemble.challenge": ensemble.challenge or "",
        "ensemble.tta_views": len(ensemble.inference.views()),
        "run_id": run.info.run_id,
    }
    version_tags.update({f"lineage.{k}": v for k, v in ensemble.lineage.items()})
    version_tags.update({f"metric.{k}": repr(float(v)) for k, v in ensemble.metrics.items()})
    version_tags.update(dict(tags or {}))
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:5000])
    if description:
        client.update_model_version(name, version, description=description)
    logger.info("registered %s version %s (%s = %.4f)", name, version, metric, ensemble.metrics[metric])
    return client.get_model_version(name, version)


# -- promotion ------------------------------------------------------------------------------------------


@dataclass
class Promotion:
    """Outcome of :func:`promote`."""

    name: str
    version: str
    promoted: bool
    forced: bool
    reason: str
    metric: str
    value: float | None
    champion_version: str | None = None
    champion_value: float | None = None
    previous_version: str | None = None


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _recorded(version: Any, metric: str) -> float | None:
    raw = (version.tags or {}).get(f"metric.{metric}")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def promote(
    name: str,
    version: str | int,
    *,
    metric: str,
    mode: str = "max",
    force: bool = False,
    client: Any = None,
) -> Promotion:
    """Give ``version`` the alias ``champion`` if it beats the current champion on ``metric``.

    The comparison uses the ``metric.<metric>`` tags recorded at registration; a tie does not
    promote. With ``force`` the alias moves regardless (tag ``promotion.forced=true``, warning
    logged). The replaced champion gets the alias ``previous``.

    Raises:
        PromotionError: the candidate has no recorded ``metric``, or the champion lacks it
            (without ``force``).
    """
    from mlflow.tracking import MlflowClient

    if mode not in ("max", "min"):
        raise ConfigError(f"mode: expected 'max' or 'min', got {mode!r}")
    client = client or MlflowClient()
    version = str(version)
    candidate = client.get_model_version(name, version)
    value = _recorded(candidate, metric)
    if value is None and not force:
        raise PromotionError(f"{name} version {version} has no recorded {metric!r} (tag metric.{metric}); "
                             "register it with that metric or use --force")
    champion = _alias_version(client, name, CHAMPION)
    champion_value = _recorded(champion, metric) if champion is not None else None
    result = Promotion(name, version, False, bool(force), "", metric, value,
                       str(champion.version) if champion is not None else None, champion_value)
    if champion is not None and str(champion.version) == version:
        result.reason = f"version {version} already is the champion"
        return result
    if champion is None:
        result.promoted, result.reason = True, "no champion yet"
    elif champion_value is None and not force:
        raise PromotionError(f"the champion ({name} version {champion.version}) has no recorded {metric!r}; "
                             "compare on a metric both versions record, or use --force")
    elif champion_value is not None and value is not None and (
            value > champion_value if mode == "max" else value < champion_value):
        result.promoted = True
        result.reason = f"{metric} {value:.4f} beats the champion's {champion_value:.4f} (v{champion.version})"
    elif force:
        result.promoted = True
        result.reason = (f"forced: {metric} {value} does not beat the champion's {champion_value} "
                         f"(v{champion.version})")
    else:
        result.reason = (f"{metric} {value:.4f} does not beat the champion's {champion_value:.4f} "
                         f"(v{champion.version}, mode {mode}); champion unchanged")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    decision = "promoted" if result.promoted else "rejected"
    for key, tag in {"promotion.decision": decision, "promotion.reason": result.reason, "promotion.time": stamp,
                     "promotion.forced": str(bool(force and result.promoted)).lower(),
                     "promotion.compared_to": result.champion_version or ""}.items():
        client.set_model_version_tag(name, version, key, tag[:5000])
    if result.promoted:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
            result.previous_version = str(champion.version)
        client.set_registered_model_alias(name, CHAMPION, version)
        if force:
            logger.warning("FORCED promotion of %s version %s to %s: %s", name, version, CHAMPION, result.reason)
        else:
            logger.info("promoted %s version %s to %s: %s", name, version, CHAMPION, result.reason)
    else:
        logger.info("%s version %s not promoted: %s", name, version, result.reason)
    return result


# -- loading ----------------------------------------------------------------------------------------------


@dataclass
class LoadedEnsemble:
    """An ensemble and where it came from (``name``/``version`` for registry URIs)."""

    ensemble: Any
    folder: Path
    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name}/{self.version}"
        return self.uri


def _ensemble_folder(model_dir: Path) -> Path:
    """The ensemble folder inside an MLflow pyfunc model directory (from its MLmodel file)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise DataError(model_dir, "not an MLflow model folder (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = ((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get(ARTIFACT_KEY)
    if not entry:
        raise DataError(mlmodel, f"not a bratstune ensemble model (no '{ARTIFACT_KEY}' artifact)")
    return model_dir / entry["path"]


def _registry_version(uri: str) -> tuple[str | None, str | None, str | None]:
    """``(name, version, run_id)`` of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("models:/"):
        return None, None, None
    body = uri[len("models:/"):].strip("/")
    client = MlflowClient()
    from mlflow.exceptions import MlflowException

    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, version = body.split("/", 1)
            mv = client.get_model_version(name, version)
        else:
            return None, None, None
    except MlflowException as exc:
        raise DataError(None, f"cannot resolve model {uri!r}: {exc.message if hasattr(exc, 'message') else exc}") from None
    return mv.name, str(mv.version), mv.run_id


def load_ensemble(source: str | Path, *, dst: Path | None = None) -> LoadedEnsemble:
    """Load (and verify) an ensemble from a registry URI, a run URI or a local folder.

    Args:
        source: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/ensemble``, an MLflow
            model folder (with ``MLmodel``) or an ensemble folder (with ``ensemble.json``).
        dst: where to download remote models (default a new temporary folder).

    Raises:
        IntegrityError: a weight or config file does not match the manifest.
        DataError: the source cannot be resolved or is not an ensemble.
    """
    from bratstune.ensemble.package import ENSEMBLE_FILE, Ensemble

    text = str(source)
    local = Path(text).expanduser()
    name = version = run_id = None
    if local.is_dir():
        folder = local if (local / ENSEMBLE_FILE).is_file() else _ensemble_folder(local)
    else:
        if "://" not in text and not text.startswith(("models:/", "runs:/")):
            raise DataError(local, "no such model folder; give a folder or a models:/NAME@champion URI")
        import mlflow

        name, version, run_id = _registry_version(text)
        target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="bratstune-model-"))
        try:
            downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(target)))
        except Exception as exc:  # MLflow raises several types for unknown URIs
            raise DataError(None, f"cannot download model {text!r}: {exc}") from None
        folder = downloaded if (downloaded / ENSEMBLE_FILE).is_file() else _ensemble_folder(downloaded)
    ensemble = Ensemble.load(folder)
    return LoadedEnsemble(ensemble, folder, text, name, version, run_id)


def resolve_member_source(source: str | Path, *, dst: Path | None = None) -> Path:
    """A trained model folder from a folder, a 32-hex MLflow run id or a ``runs:/`` URI.

    Run ids resolve to the run's ``best_model`` artifact (what ``bratstune train``, search trials
    and :class:`bratstune.tracking.runs.MlflowReporter` log).
    """
    import re

    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        return folder
    text = str(source)
    if re.fullmatch(r"[0-9a-f]{32}", text):
        text = f"runs:/{text}/best_model"
    if not text.startswith(("runs:/", "models:/")) and "://" not in text:
        raise DataError(folder, "no such model folder, and not an MLflow run id or runs:/ URI")
    import mlflow

    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst) if dst else None))
    except Exception as exc:
        raise DataError(None, f"cannot fetch member {source!r}: {exc}") from None
    found = sorted(path.rglob("config.yaml"), key=lambda p: len(p.parts))
    if not found:
        raise DataError(path, "no config.yaml in the member's artifacts (expected fit's best/ folder)")
    return found[0].parent


# -- listing ------------------------------------------------------------------------------------------------


def list_models(name: str | None = None, *, client: Any = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, selection metric and its value, metrics, created."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    rows = []
    for model_name in names:
        model = client.get_registered_model(model_name)
        aliases: dict[str, list[str]] = {}
        for alias, ver in (model.aliases or {}).items():
            aliases.setdefault(str(ver), []).append(alias)
        versions = client.search_model_versions(f"name='{model_name}'")
        for mv in sorted(versions, key=lambda v: int(v.version)):
            tags = dict(mv.tags or {})
            metrics = {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}
            selection = tags.get("selection.metric")
            rows.append({
                "name": model_name,
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "metric": selection,
                "value": metrics.get(selection) if selection else None,
                "metrics": metrics,
                "forced": tags.get("promotion.forced") == "true",
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
                "run_id": mv.run_id,
            })
    return rows


def promotion_summary(p: Promotion) -> str:
    """One line for logs and the CLI."""
    state = "PROMOTED" if p.promoted else "kept champion"
    return json.dumps({"decision": state, "name": p.name, "version": p.version, "forced": p.forced,
                       "reason": p.reason, "previous": p.previous_version})
