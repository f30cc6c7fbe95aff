"""The MLflow model registry side of ensembles: register, load, list.

* :func:`register_ensemble`: log the ensemble as a *models-from-code* ``pyfunc`` model (the
  code file :mod:`bratstune.integrity` verifies the package, then loads
  :class:`bratstune.ensemble.pyfunc.EnsembleModel`; nothing is pickled) in the active run and
  register a new version of ``name`` (one registered model per challenge,
  :func:`default_model_name`), tagged with the package digest
  (:data:`bratstune.integrity.DIGEST_TAG`: SHA-256 of the manifest of every file), lineage
  (``lineage.*``), metrics (``metric.<name>``), the selection metric and the ensemble folder's
  digest (``ensemble.digest``). See :mod:`bratstune.tracking.model_package`.
* :func:`load_ensemble`: an ensemble from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
  ``runs:/RUN/ensemble``, a run id, an MLflow model folder or an ensemble folder (sources resolved
  by :func:`bratstune.tracking.artifacts.resolve_artifact`, which checks a download against the
  digest recorded at registration before anything reads it; a temporary download is removed once
  the ensemble is in memory, unless the caller keeps it). A local folder is checked against its
  own manifest only: nothing recorded its digest.
* :func:`resolve_member_source`: a trained model folder from a folder, run id or URI.
* :func:`list_models`: rows for ``bratstune models list``.

Promotion (the ``champion`` alias) is :mod:`bratstune.ensemble.promotion`.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bratstune.ensemble.package import ARTIFACT_KEY, ENSEMBLE_FILE, Ensemble
from bratstune.errors import ConfigError, DataError
from bratstune.integrity import DIGEST_TAG, safe_join, verify_manifest
from bratstune.tracking.artifacts import is_remote, resolve_artifact
from bratstune.tracking.filters import equals
from bratstune.tracking.model_package import register_package
from bratstune.tracking.runs import package_versions

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedEnsemble",
    "default_model_name",
    "list_models",
    "load_ensemble",
    "register_ensemble",
    "resolve_member_source",
]

MODEL_NAME = "ensemble"  # the logged model's name inside its run
REQUIREMENTS = (
    "torch",
    "monai",
    "numpy",
    "nibabel",
    "safetensors",
    "scipy",
    "connected-components-3d",
    "pyyaml",
    "mlflow",
    "pandas",
)
MODEL_CLASS = "bratstune.ensemble.pyfunc:EnsembleModel"  # what the verified entry loads


# -- registration -----------------------------------------------------------------------------------


def default_model_name(challenge: str | None) -> str:
    """``bratstune-<challenge>`` (lower case), e.g. ``bratstune-gli``."""
    return f"bratstune-{(challenge or 'gli').lower()}"


def _requirements() -> list[str]:
    versions = package_versions(REQUIREMENTS)
    return [f"{name}=={versions[name]}" if name in versions else name for name in REQUIREMENTS]


def _version_tags(ensemble: Ensemble, metric: str, run_id: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    tags: dict[str, Any] = {
        "selection.metric": metric,
        "ensemble.digest": ensemble.digest,
        "ensemble.members": len(ensemble.members),
        "ensemble.scheme": ensemble.scheme.name,
        "ensemble.challenge": ensemble.challenge or "",
        "ensemble.tta_views": len(ensemble.inference.views()),
        "run_id": run_id,
    }
    # the case lists (lineage "cases") can exceed a tag's 5000 characters: they stay in ensemble.json
    tags.update({f"lineage.{k}": v for k, v in ensemble.lineage.items() if k != "cases"})
    tags.update({f"metric.{k}": repr(float(v)) for k, v in ensemble.metrics.items()})
    tags.update(dict(extra or {}))
    return tags


def register_ensemble(
    ensemble: Ensemble,
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
    if metric not in ensemble.metrics or not math.isfinite(float(ensemble.metrics[metric])):
        raise ConfigError(
            f"the ensemble has no finite value for {metric!r} (recorded: {sorted(ensemble.metrics)}); "
            "promotion needs the validation metric it compares"
        )
    run = mlflow.active_run()
    if run is None:
        raise ConfigError("register_ensemble needs an active MLflow run (use bratstune.tracking.runs.start_run)")
    with tempfile.TemporaryDirectory(prefix="bratstune-ensemble-") as tmp:
        folder = ensemble.save(Path(tmp) / "ensemble")
        mv = register_package(
            name=name,
            artifact_name=MODEL_NAME,
            model_class=MODEL_CLASS,
            artifacts={ARTIFACT_KEY: folder},
            pip_requirements=_requirements(),
            tags=_version_tags(ensemble, metric, run.info.run_id, tags),
            metadata={"bratstune_ensemble_digest": ensemble.digest},
        )
    version = str(mv.version)
    client = MlflowClient()
    if description:
        client.update_model_version(name, version, description=description)
    logger.info("registered %s version %s (%s = %.4f)", name, version, metric, ensemble.metrics[metric])
    return client.get_model_version(name, version)


# -- loading ----------------------------------------------------------------------------------------------


@dataclass
class LoadedEnsemble:
    """An ensemble and where it came from (``name``/``version`` for registry URIs).

    Attributes:
        folder: the ensemble folder on disk; ``None`` once a temporary download was removed.
        temporary: the temporary download folder this object owns (kept by
            ``load_ensemble(..., keep_download=True)``); :meth:`cleanup` removes it.
    """

    ensemble: Ensemble
    folder: Path | None
    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    temporary: Path | None = None

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name}/{self.version}"
        return self.uri

    def cleanup(self) -> None:
        """Remove the temporary download folder, if this object holds one."""
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None
            self.folder = None


def _ensemble_folder(model_dir: Path) -> Path:
    """The ensemble folder inside an MLflow pyfunc model directory (from its MLmodel file)."""
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise DataError(model_dir, "not an MLflow model folder (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = ((spec.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    entry = artifacts.get(ARTIFACT_KEY)
    if not isinstance(entry, Mapping) or not entry.get("path"):
        raise DataError(mlmodel, f"not a bratstune ensemble model (no '{ARTIFACT_KEY}' artifact)")
    return safe_join(model_dir, entry["path"], what="ensemble artifact")


def load_ensemble(source: str | Path, *, dst: Path | None = None, keep_download: bool = False) -> LoadedEnsemble:
    """Load (and verify) an ensemble from a registry URI, a run URI or a local folder.

    Args:
        source: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/ensemble``, a run id,
            an MLflow model folder (with ``MLmodel``) or an ensemble folder (with ``ensemble.json``).
        dst: where to download remote models (kept); default a new temporary folder, removed once
            the ensemble is loaded.
        keep_download: keep the temporary download (``LoadedEnsemble.folder`` stays readable)
            until :meth:`LoadedEnsemble.cleanup`.

    Raises:
        IntegrityError: a file of the package does not match its manifest, or the manifest does not
            match the digest recorded at registration (or none was recorded: an old package).
        DataError: the source cannot be resolved or is not an ensemble.
    """
    resolved = resolve_artifact(source, default_artifact=MODEL_NAME, dst=dst, what="ensemble")
    try:
        local = resolved.path
        if not is_remote(source) and (local / "MLmodel").is_file():
            # a local MLflow model folder: nothing recorded its digest, so its own manifest must hold
            verify_manifest(local)
        folder = local if (local / ENSEMBLE_FILE).is_file() else _ensemble_folder(local)
        ensemble = Ensemble.load(folder)
    except BaseException:
        resolved.cleanup()
        raise
    loaded = LoadedEnsemble(ensemble, folder, str(source), resolved.name, resolved.version, resolved.run_id)
    if keep_download:
        loaded.temporary = resolved.temporary
    else:
        loaded.folder = None if resolved.temporary is not None else folder
        resolved.cleanup()
    return loaded


def resolve_member_source(source: str | Path, *, dst: Path | None = None) -> Path:
    """A trained model folder from a folder, a 32-hex MLflow run id or a ``runs:/`` URI.

    Run ids resolve to the run's ``best_model`` artifact (what ``bratstune train``, search trials
    and :class:`bratstune.search.reporter.MlflowReporter` log).
    """
    path = resolve_artifact(source, default_artifact="best_model", dst=dst, what="model").path
    found = sorted(path.rglob("config.yaml"), key=lambda p: len(p.parts))
    if not found:
        raise DataError(path, "no config.yaml in the member's artifacts (expected fit's best/ folder)")
    return found[0].parent


# -- listing ------------------------------------------------------------------------------------------------


def _alias_map(model: Any) -> dict[str, list[str]]:
    aliases: dict[str, list[str]] = {}
    for alias, ver in (model.aliases or {}).items():
        aliases.setdefault(str(ver), []).append(alias)
    return aliases


def list_models(name: str | None = None, *, client: Any = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, selection metric and its value, metrics,
    created, and whether its package digest was recorded (``verifiable``; old packages are refused)."""
    client = client if client is not None else MlflowClient()
    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    rows = []
    for model_name in names:
        try:
            aliases = _alias_map(client.get_registered_model(model_name))
        except MlflowException as exc:
            raise DataError(None, f"no registered model {model_name!r} in the store ({exc.error_code})") from None
        versions = client.search_model_versions(equals("name", model_name))
        for mv in sorted(versions, key=lambda v: int(v.version)):
            tags = dict(mv.tags or {})
            metrics = {k[len("metric.") :]: float(v) for k, v in tags.items() if k.startswith("metric.")}
            selection = tags.get("selection.metric")
            rows.append(
                {
                    "name": model_name,
                    "version": str(mv.version),
                    "aliases": sorted(aliases.get(str(mv.version), [])),
                    "metric": selection,
                    "value": metrics.get(selection) if selection else None,
                    "metrics": metrics,
                    "forced": tags.get("promotion.forced") == "true",
                    "verifiable": bool(tags.get(DIGEST_TAG)),  # False: an old package, refused on load
                    "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
                    "run_id": mv.run_id,
                }
            )
    return rows
