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
(:class:`ResolvedArtifact.temporary` says so, and :meth:`ResolvedArtifact.cleanup` removes it;
one that a caller never removes goes when the process exits).

A registered version (``models:/NAME/...``) and any MLflow model folder that a URI fetches is a
bratstune model package: before the resolver returns, the whole download is checked against the
digest recorded at registration (:data:`bratstune.integrity.DIGEST_TAG` on the model version, or
on the logged model for ``runs:/`` and ``models:/m-...``) and against its ``manifest.json``
(:func:`bratstune.integrity.verify_manifest`). Nothing of it has been imported or deserialised
by then. A package without a recorded digest (registered by an older bratstune, with a pickled
``python_model.pkl``) is refused with how to re-register it; a mismatch raises
:class:`bratstune.integrity.IntegrityError` naming the file, and the download is removed.
``models:/`` URIs are resolved against the tracking store given (or the configured one), never
against a registry URI that an earlier ``mlflow.set_registry_uri`` in this process left behind,
and the process's MLflow settings are left as they were.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bratstune.errors import DataError
from bratstune.integrity import DIGEST_TAG, REREGISTER_HINT, IntegrityError, verify_manifest
from bratstune.tracking.runs import tracking_uri as configured_uri

__all__ = [
    "RUN_ID",
    "ResolvedArtifact",
    "is_remote",
    "localise_config",
    "registry_version",
    "resolve_artifact",
    "verify_download",
]

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
            _TEMPORARY.discard(self.temporary)
            self.temporary = None


_TEMPORARY: set[Path] = set()  # temporary downloads not yet removed; whatever is left goes at exit


def _remove_temporaries() -> None:
    for path in list(_TEMPORARY):
        shutil.rmtree(path, ignore_errors=True)
    _TEMPORARY.clear()


def _temporary_folder(what: str) -> Path:
    if not _TEMPORARY:
        atexit.unregister(_remove_temporaries)
        atexit.register(_remove_temporaries)
    path = Path(tempfile.mkdtemp(prefix=f"bratstune-{what}-"))
    _TEMPORARY.add(path)
    return path


def registry_version(uri: str, *, tracking_uri: str | None = None) -> tuple[str, str, str | None] | None:
    """``(name, version, run_id)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; else ``None``.

    Raises:
        DataError: the model, version or alias does not exist.
    """
    mv = _model_version(uri, tracking_uri)
    return None if mv is None else (mv.name, str(mv.version), mv.run_id)


def _model_version(uri: str, tracking_uri: str | None) -> Any:
    """The ``ModelVersion`` (with its tags) of a registry URI; ``None`` for other URIs."""
    if not uri.startswith("models:/"):
        return None
    body = uri[len("models:/") :].strip("/")
    if "@" not in body and "/" not in body:
        return None
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, version = body.split("/", 1)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise DataError(None, f"cannot resolve model {uri!r}: {getattr(exc, 'message', exc)}") from None


def _mlmodel(folder: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise IntegrityError(folder / "MLmodel", f"unreadable MLflow model file ({exc})") from None
    return spec if isinstance(spec, dict) else {}


def _old_package(local: Path, where: str, tags: Mapping[str, str]) -> IntegrityError:
    """The refusal of a package registered before digests were recorded, with how to re-register it."""
    flavor = (
        ((_mlmodel(local).get("flavors") or {}).get("python_function") or {}) if (local / "MLmodel").is_file() else {}
    )
    pickled = ", and its model is a pickled python_model.pkl" if flavor.get("python_model") else ""
    members = tags.get("lineage.members")
    how = f"re-register it: `bratstune promote --members {members.replace(',', ' ')}`" if members else REREGISTER_HINT
    return IntegrityError(local, f"{where} has no recorded package digest ({DIGEST_TAG}){pickled}; refusing it; {how}")


def verify_download(local: Path, *, version: Any = None, tracking_uri: str | None = None) -> str | None:
    """Check a fetched model package against the digest recorded for it, before anything reads it.

    Args:
        local: the downloaded folder (or file).
        version: the ``ModelVersion`` it was fetched as (``models:/NAME/...``), if any.
        tracking_uri: the store holding the logged model (for ``runs:/`` and ``models:/m-...``).

    Returns:
        The verified digest; ``None`` for a download that is no model package (a trained model's
        run artifacts, a YAML file).

    Raises:
        IntegrityError: no recorded digest, or the files do not match it.
    """
    local = Path(local)
    if version is not None:
        tags = dict(version.tags or {})
        where = f"models:/{version.name}/{version.version}"
    elif local.is_dir() and (local / "MLmodel").is_file():
        model_id = _mlmodel(local).get("model_id")
        try:
            tags = dict(MlflowClient(tracking_uri=tracking_uri).get_logged_model(str(model_id)).tags or {})
        except MlflowException as exc:
            raise IntegrityError(local, f"no logged model {model_id!r} to check this package against ({exc})") from None
        where = f"logged model {model_id}"
    else:
        return None
    expected = tags.get(DIGEST_TAG)
    if not expected:
        raise _old_package(local, where, tags)
    return verify_manifest(local, expected=expected)


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
    mv = _model_version(uri, store)
    version = None if mv is None else (mv.name, str(mv.version), mv.run_id)
    temporary = None
    if dst is None:
        temporary = _temporary_folder(what)
        dst = temporary
    Path(dst).mkdir(parents=True, exist_ok=True)
    if version is not None:
        # The version's own artifact location: no global registry URI is read or changed.
        client = MlflowClient(tracking_uri=store, registry_uri=store)
        uri = client.get_model_version_download_uri(version[0], version[1])
    existing = {p.name for p in Path(dst).iterdir()}
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store)
    except Exception as exc:  # MLflow raises several unrelated types for an unknown URI
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise DataError(None, f"cannot download {what} {text!r} from {store}: {exc}") from None
    try:
        verify_download(Path(local), version=mv, tracking_uri=store)
    except BaseException:  # a refused package is not left behind (in dst: only a folder this download made)
        made = Path(local).resolve()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        elif made.parent == Path(dst).resolve() and made.name not in existing:
            shutil.rmtree(made, ignore_errors=True)
        raise
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
