"""The SHA-256 manifest of a packaged ensemble folder: written on save, verified on load.

``manifest.json`` lists every file of the package (the manifest itself excepted; hidden files
included) with its SHA-256::

    {"algorithm": "sha256", "files": {"ensemble.json": "...", "members/00-fold0.safetensors": "..."}}

A file whose hash differs from the manifest, a missing file, an unexpected extra file, a symbolic
link or a listed path that leaves the folder makes :func:`verify_manifest` raise
:class:`IntegrityError` naming the file. The SHA-256 of ``manifest.json`` itself is the package's
digest (``Ensemble.digest``, the ``model`` of a prediction ledger).

The rules live in :mod:`bratstune.integrity`, shared with the registered MLflow model (whose own
manifest covers this folder, ``MLmodel`` and the code) and the MAE encoder; this module is the
ensemble's name for them.
"""

from __future__ import annotations

from bratstune.integrity import MANIFEST_FILE, IntegrityError, manifest_digest, verify_manifest, write_manifest

__all__ = ["MANIFEST_FILE", "IntegrityError", "manifest_digest", "verify_manifest", "write_manifest"]
