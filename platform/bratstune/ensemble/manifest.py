"""The SHA-256 manifest of a packaged ensemble folder: written on save, verified on load.

``manifest.json`` lists every file of the package (hidden files and the manifest itself
excepted) with its SHA-256::

    {"algorithm": "sha256", "files": {"ensemble.json": "...", "members/00-fold0.safetensors": "..."}}

A file whose hash differs from the manifest, a missing file or an unexpected extra file makes
:func:`verify_manifest` raise :class:`IntegrityError` naming the file. The SHA-256 of
``manifest.json`` itself is the package's digest (the ``ensemble.digest`` tag of a registered
version, the ``model`` of a prediction ledger).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bratstune.data.cache import file_digest
from bratstune.errors import DataError

__all__ = ["MANIFEST_FILE", "IntegrityError", "manifest_digest", "verify_manifest", "write_manifest"]

MANIFEST_FILE = "manifest.json"


class IntegrityError(DataError):
    """A packaged ensemble file does not match its manifest (tampered, truncated or missing)."""


def _package_files(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != MANIFEST_FILE and not any(p.startswith(".") for p in rel.parts):
            out.append(rel.as_posix())
    return out


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every file of ``folder`` (except the manifest and hidden files) into ``manifest.json``."""
    folder = Path(folder)
    manifest = {"algorithm": "sha256", "files": {rel: file_digest(folder / rel) for rel in _package_files(folder)}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def manifest_digest(folder: Path) -> str:
    """SHA-256 of ``folder/manifest.json`` (the package's digest)."""
    return hashlib.sha256((Path(folder) / MANIFEST_FILE).read_bytes()).hexdigest()


def verify_manifest(folder: Path) -> str:
    """Check every file of a package against ``manifest.json``; return the manifest's SHA-256.

    Raises:
        IntegrityError: no manifest, a listed file missing or different, or an unlisted file.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        raw = path.read_bytes()
        files = dict(json.loads(raw)["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(path, f"missing or unreadable model manifest ({exc}); the package is incomplete") from None
    for rel, expected in sorted(files.items()):
        target = folder / rel
        if not target.is_file():
            raise IntegrityError(target, "listed in manifest.json but missing; the model package is incomplete")
        actual = file_digest(target)
        if actual != expected:
            raise IntegrityError(
                target,
                f"SHA-256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): the file was modified "
                "after the model was packaged; refusing to load it (re-register the model from its source)",
            )
    extra = sorted(set(_package_files(folder)) - set(files))
    if extra:
        raise IntegrityError(folder / extra[0], "not listed in manifest.json; refusing to load a modified package")
    return hashlib.sha256(raw).hexdigest()
