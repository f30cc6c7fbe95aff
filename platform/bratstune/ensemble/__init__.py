"""Ensembles: the package on disk, its MLflow registration, the promotion gate.

* :mod:`~bratstune.ensemble.package`: :class:`Ensemble` (members + inference recipe + decode
  settings + scheme; save / load / segment) and :class:`Segmentation`;
* :mod:`~bratstune.ensemble.member`: :class:`Member` (one trained network and its saved config);
* :mod:`~bratstune.ensemble.manifest`: the SHA-256 manifest, :class:`IntegrityError`;
* :mod:`~bratstune.ensemble.pyfunc`: the MLflow ``pyfunc`` model;
* :mod:`~bratstune.ensemble.registry`: register, load (any source), list;
* :mod:`~bratstune.ensemble.promotion`: the ``champion`` gate.

Nothing here imports the training loop.
"""

from __future__ import annotations

from bratstune.ensemble.manifest import IntegrityError, verify_manifest, write_manifest
from bratstune.ensemble.member import Member
from bratstune.ensemble.package import Ensemble, Segmentation
from bratstune.ensemble.promotion import CHAMPION, PREVIOUS, Promotion, PromotionError, promote
from bratstune.ensemble.registry import (
    LoadedEnsemble,
    default_model_name,
    list_models,
    load_ensemble,
    register_ensemble,
    resolve_member_source,
)

__all__ = [
    "CHAMPION",
    "PREVIOUS",
    "Ensemble",
    "IntegrityError",
    "LoadedEnsemble",
    "Member",
    "Promotion",
    "PromotionError",
    "Segmentation",
    "default_model_name",
    "list_models",
    "load_ensemble",
    "promote",
    "register_ensemble",
    "resolve_member_source",
    "verify_manifest",
    "write_manifest",
]
