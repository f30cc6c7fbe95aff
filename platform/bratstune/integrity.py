"""Model packages that cannot be swapped: SHA-256 manifests, recorded digests, a guarded entry point.

A *package* is a folder whose ``manifest.json`` lists the SHA-256 of every other file in it::

    {"algorithm": "sha256", "files": {"MLmodel": "...", "artifacts/ensemble/ensemble.json": "...", ...}}

The SHA-256 of ``manifest.json`` itself is the package's *digest*. A registered bratstune model
(an ensemble, the MAE encoder) is an MLflow *models-from-code* model whose manifest covers every
file of the model folder: weights (safetensors / ``weights_only`` tensors), configs, decode
settings, ``MLmodel``, the environment files, the model's code file and the ``code/`` it ships.
Registration records the digest on the model version (tag :data:`DIGEST_TAG`) and on the logged
model, outside the package, where whoever can rewrite the package's files cannot follow.

:func:`verify_manifest` checks a folder: the manifest's digest against the recorded one (when
given), every listed path stays inside the folder (no ``..``, no absolute path, no symbolic
link), every listed file has its hash, and no file is unlisted (a planted ``python_model.pkl``
or ``__pycache__`` is refused). Any failure raises :class:`IntegrityError` naming the file.

This file is also the **code file** of every registered bratstune model (MLflow runs it as
``code_model_<uuid>``, never as ``bratstune.integrity``). ``mlflow.pyfunc.load_model`` then:

1. downloads the model folder (for ``models:/NAME/...`` it writes :data:`REGISTERED_META`, the
   version it resolved) and reads ``MLmodel`` and ``requirements.txt`` as data;
2. puts the model's ``code/`` at the front of ``sys.path`` (nothing is imported from it yet);
3. executes this file (``model_code_path`` in ``MLmodel``): standard library only at the top, it
   defines an entry model and calls ``mlflow.models.set_model``; nothing of the package is imported;
4. calls the entry's ``load_context``, which reads the digest recorded for the version that was
   asked for (otherwise for the logged model named in ``MLmodel``), verifies every file against
   it, and only then imports the real model class (an allow-listed ``bratstune`` class named in
   ``MLmodel``'s metadata) with bytecode writing off, and delegates ``load_context`` / ``predict``
   (and any other attribute) to it.

What this cannot cover: MLflow acts on ``MLmodel`` before step 3, so a package whose ``MLmodel``
names another loader module or a pickle instead of this file never reaches step 4 under a bare
``mlflow.pyfunc.load_model`` (MLflow 3.17 unpickles by default). bratstune's loaders
(:func:`bratstune.tracking.artifacts.resolve_artifact`, hence ``load_ensemble``, ``init.encoder_from``
and :func:`bratstune.tracking.model_package.load_verified_pyfunc`) check the whole download against
the recorded digest before MLflow or anything else reads it, and refuse such a package.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

_IN_PACKAGE = __name__.startswith("bratstune.")

if _IN_PACKAGE:
    from bratstune.errors import DataError as _ErrorBase
else:  # run by MLflow as a model's code file: nothing of the (not yet verified) package is imported

    class _ErrorBase(ValueError):  # the same message and arguments as bratstune.errors.DataError
        def __init__(self, path: str | Path | None, problem: str) -> None:
            self.path = None if path is None else Path(path)
            self.problem = problem
            super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

        def __reduce__(self):
            return (type(self), (self.path, self.problem))


__all__ = [
    "DIGEST_TAG",
    "MANIFEST_FILE",
    "MODEL_CLASS_KEY",
    "MODEL_CLASSES",
    "REGISTERED_META",
    "REREGISTER_HINT",
    "IntegrityError",
    "manifest_digest",
    "package_files",
    "safe_join",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
#: written by MLflow into a model folder on every ``models:/NAME/...`` download (name and version,
#: plain YAML that nothing executes): the one file a package may hold beyond its manifest
REGISTERED_META = "registered_model_meta"
#: model-version (and logged-model) tag holding the SHA-256 of the package's manifest.json
DIGEST_TAG = "bratstune.manifest_sha256"
#: ``MLmodel`` metadata key naming the model class the entry imports once the package is verified
MODEL_CLASS_KEY = "bratstune_python_model"
#: the only classes the entry will import (``module:Class``)
MODEL_CLASSES = ("bratstune.ensemble.pyfunc:EnsembleModel", "bratstune.pretrain.export:MaeEncoderModel")
REREGISTER_HINT = (
    "re-register it with this bratstune: an ensemble with `bratstune promote --members RUN_ID ...` "
    "(or `python jobs/promote_ensemble.py --members RUN_ID ...`), the MAE encoder by re-running "
    "`python jobs/pretrain_mae.py --register-as NAME`"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class IntegrityError(_ErrorBase):
    """A model package does not match its manifest or its recorded digest (tampered, truncated, foreign)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def safe_join(root: Path, rel: Any, *, what: str = "file") -> Path:
    """``root / rel`` after checking that ``rel`` names a path inside ``root``.

    ``rel`` must be a relative POSIX path without ``..``, empty parts or backslashes, and what it
    names must not leave ``root`` through a symbolic link.

    Raises:
        IntegrityError: ``rel`` escapes the package.
    """
    root = Path(root)
    text = rel if isinstance(rel, str) else ""
    parts = PurePosixPath(text).parts
    if (
        not parts
        or "\\" in text
        or "\x00" in text
        or PurePosixPath(text).is_absolute()
        or any(p in ("..", ".") for p in parts)
        or ":" in parts[0]
    ):
        raise IntegrityError(root, f"{what} path {rel!r} is not a relative path inside the package; refusing it")
    joined = root.joinpath(*parts)
    if not joined.resolve().is_relative_to(root.resolve()):
        raise IntegrityError(joined, f"{what} path {rel!r} leads outside the package; refusing it")
    return joined


def package_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden ones too) as sorted POSIX paths, except ``manifest.json``
    and MLflow's :data:`REGISTERED_META`.

    Raises:
        IntegrityError: a symbolic link or anything that is not a plain file or folder.
    """
    folder = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = here / name
            if path.is_symlink():
                raise IntegrityError(path, "symbolic link inside a model package; refusing to load it")
        for name in filenames:
            path = here / name
            if not path.is_file():
                raise IntegrityError(path, "not a plain file; refusing to load a model package holding it")
            rel = path.relative_to(folder).as_posix()
            if rel not in (MANIFEST_FILE, REGISTERED_META):
                out.append(rel)
    return sorted(out)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every file of ``folder`` into ``folder/manifest.json`` (written atomically); returns it."""
    folder = Path(folder)
    manifest = {"algorithm": "sha256", "files": {rel: _sha256(folder / rel) for rel in package_files(folder)}}
    tmp = folder.parent / f".{folder.name}.{MANIFEST_FILE}.{os.getpid()}-{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST_FILE)
    return manifest


def manifest_digest(folder: Path) -> str:
    """SHA-256 of ``folder/manifest.json`` (the package's digest)."""
    return _sha256(Path(folder) / MANIFEST_FILE)


def _listed_files(path: Path, raw: bytes) -> dict[str, str]:
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if manifest.get("algorithm", "sha256") != "sha256" or not isinstance(files, dict):
            raise ValueError("expected {'algorithm': 'sha256', 'files': {path: sha256}}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(path, f"unreadable model manifest ({exc}); refusing to load the package") from None
    for rel, digest in files.items():
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise IntegrityError(path, f"manifest entry {rel!r} has no SHA-256 hex digest; refusing the package")
    return files


def verify_manifest(folder: Path, *, expected: str | None = None) -> str:
    """Check a package folder against its manifest (and the manifest against ``expected``).

    Args:
        folder: the package folder (holding ``manifest.json``).
        expected: the digest recorded at registration; ``None`` checks the folder only against
            its own manifest (a local folder nobody registered).

    Returns:
        The package's digest (SHA-256 of ``manifest.json``).

    Raises:
        IntegrityError: no manifest; its digest differs from ``expected``; a listed path leaves
            the folder; a listed file is missing or differs; a file is not listed.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        raise IntegrityError(path, f"missing model manifest: not a bratstune package, or an old one; {REREGISTER_HINT}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if expected is not None and digest != expected:
        raise IntegrityError(
            path,
            f"SHA-256 {digest[:12]}... differs from the digest recorded at registration ({expected[:12]}...): "
            "the package was changed after it was registered; refusing to load it",
        )
    files = _listed_files(path, raw)
    targets = {rel: safe_join(folder, rel, what="manifest") for rel in sorted(files)}
    extra = sorted(set(package_files(folder)) - set(files))
    if extra:
        raise IntegrityError(folder / extra[0], "not listed in manifest.json; refusing to load a modified package")
    for rel, target in targets.items():
        if not target.is_file():
            raise IntegrityError(target, "listed in manifest.json but missing; the model package is incomplete")
        actual = _sha256(target)
        if actual != files[rel]:
            raise IntegrityError(
                target,
                f"SHA-256 mismatch (manifest {files[rel][:12]}..., file {actual[:12]}...): the file was modified "
                "after the model was packaged; refusing to load it (re-register the model from its source)",
            )
    return digest


# -- the models-from-code entry (only when MLflow runs this file as a model's code) -------------------


def _library(module: str) -> Any:
    """An MLflow (or PyYAML) module, for the entry only, when MLflow is the caller; named rather
    than imported at the top, so that bratstune's own use of this module depends on neither."""
    return importlib.import_module(module)


def _recorded_digest(root: Path) -> str:
    """The digest recorded for the model being loaded: on its model version, else its logged model.

    MLflow writes :data:`REGISTERED_META` (``model_name``, ``model_version``) into every
    ``models:/NAME/...`` download just before loading it, so a package swapped for another
    registered one is checked against the version asked for; other loads (``runs:/``,
    ``models:/m-...``, a folder) use the logged model named in ``MLmodel``.
    """
    client = _library("mlflow.tracking").MlflowClient()
    try:
        meta = (
            _library("yaml").safe_load((root / REGISTERED_META).read_text())
            if (root / REGISTERED_META).is_file()
            else None
        )
        if isinstance(meta, dict) and meta.get("model_name") and meta.get("model_version"):
            mv = client.get_model_version(str(meta["model_name"]), str(meta["model_version"]))
            where, tags = f"models:/{mv.name}/{mv.version}", mv.tags
        else:
            model_id = _library("mlflow.models").Model.load(str(root / "MLmodel")).model_id
            where, tags = f"logged model {model_id}", client.get_logged_model(model_id).tags
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types; all mean "not verifiable"
        raise IntegrityError(root, f"cannot read the digest recorded for this model ({exc}); refusing to load it")
    digest = (tags or {}).get(DIGEST_TAG)
    if not digest:
        raise IntegrityError(
            root, f"{where} has no recorded package digest ({DIGEST_TAG}): an old package; {REREGISTER_HINT}"
        )
    return digest


def _import_model_class(root: Path) -> Any:
    """The allow-listed model class named in the (verified) ``MLmodel``, imported without writing bytecode."""
    target = (_library("mlflow.models").Model.load(str(root / "MLmodel")).metadata or {}).get(MODEL_CLASS_KEY)
    if target not in MODEL_CLASSES:
        raise IntegrityError(root / "MLmodel", f"model class {target!r} is not one of {list(MODEL_CLASSES)}")
    module_name, class_name = target.split(":")
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # the package folder stays exactly as verified: no __pycache__ in code/
    try:
        module = importlib.import_module(module_name)
    finally:
        sys.dont_write_bytecode = before
    return getattr(module, class_name)


def _forget_code(root: Path) -> None:
    """Take a refused package's ``code/`` off ``sys.path``, where MLflow put it before loading it.

    Otherwise a later ``import bratstune...`` in this process would import the refused code.
    """
    inside = root.resolve()
    keep = [p for p in sys.path if not (p and Path(p).resolve().is_relative_to(inside))]
    for path in set(sys.path) - set(keep):
        sys.path_importer_cache.pop(path, None)
    sys.path[:] = keep


def _install_entry() -> None:
    code_file = Path(__file__).resolve()

    class VerifiedModel(_library("mlflow.pyfunc").PythonModel):
        """Verifies the package against its recorded digest, then loads the real model class."""

        def load_context(self, context):
            root = code_file.parent  # MLflow copies the code file to the model folder's root
            try:
                verify_manifest(root, expected=_recorded_digest(root))
            except BaseException:
                _forget_code(root)
                raise
            self._inner = _import_model_class(root)()
            self._inner.load_context(context)

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema
            return self._inner.predict(context, model_input, params=params)

        def __getattr__(self, name):  # e.g. unwrap_python_model().predict_probabilities(image)
            inner = self.__dict__.get("_inner")
            if inner is None:
                raise AttributeError(name)
            return getattr(inner, name)

    _library("mlflow.models").set_model(VerifiedModel())


if not _IN_PACKAGE:
    # A process that already imported bratstune raises (and catches) its own IntegrityError class.
    IntegrityError = getattr(sys.modules.get("bratstune.integrity"), "IntegrityError", IntegrityError)  # noqa: F811
    _install_entry()
