"""The one resolver of "where is this model?": path, run id, ``runs:/`` or ``models:/`` -> local folder.

Every command and job that takes a trained model, an ensemble or an encoder accepts the same
forms, resolved here and nowhere else::

    /path/to/folder                 used as it is (never copied)
    0123...cdef (32 hex digits)     an MLflow run id: its ``default_artifact`` (e.g. ``best_model``)
    runs:/RUN_ID[/path]             an artifact of a run
    models:/NAME/VERSION            a registered model version
    models:/NAME@ALIAS              a registered model by alias (``champion``)
    any URI MLflow's artifact repositories understand (``s3://...``, ``file://...``)

Downloads go to ``dst`` when given; otherwise to a fresh temporary folder that the caller owns
(:class:`ResolvedArtifact.temporary` says so, and :meth:`ResolvedArtifact.cleanup` removes it).
``models:/`` URIs are resolved against the tracking store given (or the configured one), never
against a registry URI that an earlier ``mlflow.set_registry_uri`` in this process left behind,
and the process's MLflow settings are left as they were.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bratstune.errors import DataError
from bratstune.tracking.runs import tracking_uri as configured_uri

__all__ = ["RUN_ID", "ResolvedArtifact", "is_remote", "localise_config", "registry_version", "resolve_artifact"]

RUN_ID = re.compile(r"[0-9a-f]{32}")
_SCHEMES = ("runs:/", "models:/")


def is_remote(source: str | Path) -> bool:
    """True for a run id or a URI (anything MLflow must fetch), False for a local path."""
    text = str(source)
    return bool(RUN_ID.fullmatch(text)) or text.startswith(_SCHEMES) or "://" in text


@dataclass
class ResolvedArtifact:
    """A local folder (or file) and where it came from.

    Attributes:
        path: the local folder or file.
        uri: the URI it was downloaded from (the path itself for local sources).
        temporary: ``path`` lies in a temporary folder created here; the caller removes it
            (:meth:`cleanup`) once the model is loaded.
        name, version, run_id: the registered model version, for ``models:/`` URIs.
    """

    path: Path
    uri: str
    temporary: Path | None = None
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    def cleanup(self) -> None:
        """Remove the temporary download folder, if this resolution made one."""
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def registry_version(uri: str, *, tracking_uri: str | None = None) -> tuple[str, str, str | None] | None:
    """``(name, version, run_id)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; else ``None``.

    Raises:
        DataError: the model, version or alias does not exist.
    """
    if not uri.startswith("models:/"):
        return None
    body = uri[len("models:/") :].strip("/")
    if "@" not in body and "/" not in body:
        return None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = body.split("/", 1)
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise DataError(None, f"cannot resolve model {uri!r}: {getattr(exc, 'message', exc)}") from None
    return mv.name, str(mv.version), mv.run_id


def resolve_artifact(
    source: str | Path,
    *,
    default_artifact: str | None = None,
    dst: Path | None = None,
    tracking_uri: str | None = None,
    what: str = "model",
) -> ResolvedArtifact:
    """A local path for ``source`` (see the module docstring for the accepted forms).

    Args:
        source: local path, run id or URI.
        default_artifact: artifact path used for a bare run id (``runs:/ID/<default_artifact>``);
            ``None`` fetches the whole run's artifacts.
        dst: download folder (created if needed); default a new temporary folder.
        tracking_uri: MLflow tracking (and registry) store; default the configured one
            (``MLFLOW_TRACKING_URI`` or the embedded SQLite store).
        what: what the source is, for error messages ("model", "encoder", "ensemble").

    Raises:
        DataError: a local path that does not exist, or a URI MLflow cannot fetch.
    """
    text = str(source)
    if not is_remote(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(path, f"no such {what} folder or file, and not an MLflow run id, runs:/ or models:/ URI")
        return ResolvedArtifact(path=path, uri=text)
    uri = text
    if RUN_ID.fullmatch(text):
        uri = f"runs:/{text}/{default_artifact}" if default_artifact else f"runs:/{text}"
    store = tracking_uri or configured_uri()
    version = registry_version(uri, tracking_uri=store)
    temporary = None
    if dst is None:
        temporary = Path(tempfile.mkdtemp(prefix=f"bratstune-{what}-"))
        dst = temporary
    Path(dst).mkdir(parents=True, exist_ok=True)
    if version is not None:
        # The version's own artifact location: no global registry URI is read or changed.
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        uri = client.get_model_version_download_uri(version[0], version[1])
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store)
    except Exception as exc:  # MLflow raises several unrelated types for an unknown URI
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise DataError(None, f"cannot download {what} {text!r} from {store}: {exc}") from None
    name, ver, run_id = version if version else (None, None, None)
    return ResolvedArtifact(Path(local), text, temporary, name, ver, run_id)


def localise_config(
    config: Mapping[str, Any], *, dst: Path | None = None, tracking_uri: str | None = None
) -> tuple[dict[str, Any], ResolvedArtifact | None]:
    """Resolve the URIs inside a training-config mapping to local paths, before ``fit`` is called.

    Training never talks to MLflow: ``init.encoder_from: models:/bratstune-mae-encoder@latest``
    (or ``runs:/...``, a run id) is downloaded here and replaced by the local folder. A local path
    is left as it is.

    Args:
        config: a training-config mapping (``TrainConfig.to_dict()``, YAML, a trial's config);
            nested (``{"init": {"encoder_from": ...}}``) or flat (``{"init.encoder_from": ...}``).
        dst: download folder (e.g. the trial's folder); default a temporary folder, which the
            caller removes with the returned artifact's :meth:`ResolvedArtifact.cleanup` after
            ``fit`` has built its network.
        tracking_uri: MLflow store; default the configured one.

    Returns:
        ``(config, artifact)``: a copy of the mapping with local paths, and the downloaded
        artifact (``None`` when nothing was remote).
    """
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(config).items()}
    flat = "init.encoder_from" in out
    source = out.get("init.encoder_from") if flat else (out.get("init") or {}).get("encoder_from")
    if source is None or not is_remote(source):
        return out, None
    artifact = resolve_artifact(source, default_artifact="encoder", dst=dst, tracking_uri=tracking_uri, what="encoder")
    if flat:
        out["init.encoder_from"] = str(artifact.path)
    else:
        out["init"]["encoder_from"] = str(artifact.path)
    return out, artifact
