"""Register a verified model package: models-from-code, a manifest of every file, the digest recorded.

:func:`register_package` is how the ensemble (:func:`bratstune.ensemble.registry.register_ensemble`)
and the MAE encoder (:func:`bratstune.pretrain.export.register_encoder`) reach the registry:

1. a logged model is created in the active run (what ``mlflow.pyfunc.log_model`` does first);
2. the MLflow model folder is written locally with ``mlflow.pyfunc.save_model``: the model is the
   code file :mod:`bratstune.integrity` (*models-from-code*: no ``python_model.pkl``, nothing is
   pickled), the weights and configs are ``artifacts``, the ``bratstune`` package is ``code/``,
   and ``MLmodel``'s metadata names the allow-listed class the entry loads once verified;
3. ``manifest.json`` is written over **every** file of that folder (``MLmodel``, the code file,
   ``code/``, environment files, weights, configs);
4. exactly those files are uploaded, and a model version is registered with the manifest's
   SHA-256 as its tag :data:`bratstune.integrity.DIGEST_TAG` (set when the version is created, so
   no version exists without it); the logged model carries the same tag (``runs:/`` loads).

MLflow's ``log_model`` offers no step between writing the folder and uploading it, hence the
four public calls (``create_logged_model``, ``save_model``, ``log_model_artifacts``,
``register_model``) instead of one.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model
from mlflow.tracking import MlflowClient

import bratstune.integrity as integrity
from bratstune.errors import ConfigError, DataError
from bratstune.tracking.artifacts import resolve_artifact

logger = logging.getLogger(__name__)

__all__ = ["CODE_FILE", "PACKAGE_DIR", "load_verified_pyfunc", "register_package"]

#: the models-from-code file of every registered bratstune model (verifies, then loads)
CODE_FILE = Path(integrity.__file__).resolve()
#: the ``bratstune`` package, shipped as the model's ``code/``
PACKAGE_DIR = CODE_FILE.parent


def _save_folder(
    local: Path,
    mlflow_model: Model,
    *,
    model_class: str,
    artifacts: Mapping[str, Path],
    pip_requirements: Sequence[str],
    metadata: Mapping[str, Any],
    staging: Path,
) -> str:
    """Write the MLflow model folder ``local`` and its manifest; returns the digest."""
    code = staging / "code" / PACKAGE_DIR.name
    shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    mlflow.pyfunc.save_model(
        path=str(local),
        python_model=str(CODE_FILE),
        artifacts={key: str(value) for key, value in artifacts.items()},
        code_paths=[str(code)],
        pip_requirements=list(pip_requirements),
        mlflow_model=mlflow_model,
        metadata={integrity.MODEL_CLASS_KEY: model_class, **dict(metadata)},
    )
    for cache in sorted(local.rglob("__pycache__")):  # saving executes the code file
        shutil.rmtree(cache, ignore_errors=True)
    integrity.write_manifest(local)
    return integrity.manifest_digest(local)


def register_package(
    *,
    name: str,
    artifact_name: str,
    model_class: str,
    artifacts: Mapping[str, Path],
    pip_requirements: Sequence[str],
    tags: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """Log a models-from-code package in the active run and register it as a new version of ``name``.

    Args:
        name: registered model name.
        artifact_name: the logged model's name inside its run (``runs:/RUN/<artifact_name>``).
        model_class: ``module:Class`` the entry loads after verification (one of
            :data:`bratstune.integrity.MODEL_CLASSES`).
        artifacts: ``{key: local file or folder}`` (``context.artifacts[key]`` at load time).
        pip_requirements: the model's requirements.
        tags: extra model-version tags (set when the version is created).
        metadata: extra ``MLmodel`` metadata.

    Returns:
        The ``ModelVersion``; its tag :data:`bratstune.integrity.DIGEST_TAG` is the package digest.

    Raises:
        ConfigError: no active run, or a class the entry would refuse to load.
    """
    if model_class not in integrity.MODEL_CLASSES:
        raise ConfigError(f"model_class {model_class!r}: expected one of {list(integrity.MODEL_CLASSES)}")
    run = mlflow.active_run()
    if run is None:
        raise ConfigError(f"registering {name} needs an active MLflow run (bratstune.tracking.runs.start_run)")
    run_id = run.info.run_id
    client = MlflowClient()
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=artifact_name, source_run_id=run_id, model_type="bratstune"
    )
    client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=0)])
    mlflow_model = Model(
        artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id, model_uuid=logged.model_id
    )
    with tempfile.TemporaryDirectory(prefix="bratstune-package-") as tmp:
        local = Path(tmp) / "model"
        digest = _save_folder(
            local,
            mlflow_model,
            model_class=model_class,
            artifacts=artifacts,
            pip_requirements=pip_requirements,
            metadata=metadata or {},
            staging=Path(tmp),
        )
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.set_logged_model_tags(logged.model_id, {integrity.DIGEST_TAG: digest})
    version_tags = {key: str(value)[:5000] for key, value in dict(tags or {}).items()}
    version_tags[integrity.DIGEST_TAG] = digest
    version = mlflow.register_model(f"models:/{logged.model_id}", name, tags=version_tags)
    logger.info("registered %s version %s (package digest %s...)", name, version.version, digest[:12])
    return client.get_model_version(name, str(version.version))


def load_verified_pyfunc(source: str, *, dst: Path | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` of a registered package, verified before MLflow reads any of it.

    The package is fetched and checked against the digest recorded at registration by
    :func:`bratstune.tracking.artifacts.resolve_artifact` first, so not even ``MLmodel`` is acted
    on unchecked (a bare ``mlflow.pyfunc.load_model`` trusts ``MLmodel``; see
    :mod:`bratstune.integrity`). The download goes to ``dst``, or to a temporary folder that is
    removed when the returned model is garbage-collected or the process exits (its ``code/`` stays
    importable while the model lives).

    Raises:
        IntegrityError: no recorded digest, or a file that does not match it.
    """
    resolved = resolve_artifact(source, dst=dst, what="model")
    try:
        if not (resolved.path / "MLmodel").is_file():
            raise DataError(resolved.path, "not an MLflow model folder (no MLmodel file)")
        model = mlflow.pyfunc.load_model(str(resolved.path))
    except BaseException:
        resolved.cleanup()
        raise
    if resolved.temporary is not None:
        weakref.finalize(model, shutil.rmtree, str(resolved.temporary), ignore_errors=True)
    return model
