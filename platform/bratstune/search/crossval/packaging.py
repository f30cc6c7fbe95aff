"""Stages 5 and 6, packaging and registration: the fold models become one ensemble, maybe the champion.

The fold models become the members of an :class:`bratstune.ensemble.package.Ensemble` with the
tuned decode settings, the training fingerprint (:func:`bratstune.data.fingerprint.training_fingerprint`),
lineage (``cv_run_id``, ``search_run_id``, data fingerprint, git commit) and metrics
(``cv/dice_lesion_mean`` = tuned pooled OOF); saved to ``<out>/ensemble`` and, when the spec
names a model, registered in the CV parent run and promoted through the gate
(:mod:`bratstune.ensemble.registry`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from bratstune.data.fingerprint import training_fingerprint
from bratstune.ensemble import promotion, registry
from bratstune.ensemble.member import Member
from bratstune.ensemble.package import Ensemble
from bratstune.search.crossval.decode_tuning import DecodeTuning
from bratstune.search.crossval.fold_trials import BEST_DIR, FOLDS_DIR
from bratstune.search.crossval.folds import FoldPlan
from bratstune.search.crossval.parent_run import prefixed
from bratstune.tracking.runs import git_commit

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_METRIC", "Registration", "build_ensemble", "register"]

#: The ensemble metric promotion compares (pooled OOF lesion-wise Dice after threshold tuning).
DEFAULT_METRIC = "cv/dice_lesion_mean"


def _metrics(tuning: DecodeTuning) -> dict[str, float]:
    metrics = {**prefixed("cv/", tuning.tuned), **prefixed("cv/default/", tuning.default)}
    for i, fold in enumerate(tuning.fold_metrics):
        metrics.update(prefixed(f"cv/fold{i}/", {m: v for m, v in fold.items() if m.endswith("_mean")}))
    if DEFAULT_METRIC not in metrics and "cv/dice_mean" in metrics:
        logger.warning("no lesion-wise metric (unknown challenge): %s is not recorded", DEFAULT_METRIC)
    return metrics


def _lineage(plan: FoldPlan, cv_run_id: str, search_run_id: str | None) -> dict[str, str]:
    prepared = plan.prepared
    lineage = {
        "cv_run_id": cv_run_id,
        "data_fingerprint": prepared.fingerprint,
        "data_root": str(Path(prepared.root).absolute()),
        "folds": str(plan.k),
    }
    if search_run_id:
        lineage["search_run_id"] = search_run_id
    commit = git_commit().get("commit")
    if commit:
        lineage["git_commit"] = commit
    return lineage


def build_ensemble(
    out_dir: Path,
    plan: FoldPlan,
    tuning: DecodeTuning,
    *,
    cv_run_id: str,
    search_run_id: str | None = None,
    inference: Mapping[str, Any] | None = None,
) -> Ensemble:
    """The fold models (``<out>/folds/fold<i>/best_model``) as one ensemble with the tuned decode."""
    members = [
        Member.from_folder(out_dir / FOLDS_DIR / f"fold{i}" / BEST_DIR, plan.scheme, name=f"fold{i}")
        for i in range(plan.k)
    ]
    return Ensemble.from_members(
        members,
        scheme=plan.scheme,
        challenge=plan.challenge,
        inference=inference or None,
        decode=tuning.settings,
        training_fingerprint=training_fingerprint(c.fingerprint for c in plan.prepared.cases),
        lineage=_lineage(plan, cv_run_id, search_run_id),
        metrics=_metrics(tuning),
    )


@dataclass
class Registration:
    """Where registration left the ensemble.

    Attributes:
        registered: ``NAME/VERSION`` of the new model version.
        promotion: the gate's ``bratstune.ensemble.registry.Promotion`` (``None`` when not asked).
    """

    registered: str
    promotion: Any = None


def register(
    ensemble: Ensemble, name: str, *, parent_run_id: str, metric: str, promote: bool, force: bool
) -> Registration:
    """Register the ensemble in the CV parent run and (optionally) promote it through the gate."""
    with mlflow.start_run(run_id=parent_run_id):
        tags = {"cv_run_id": parent_run_id}
        version = str(registry.register_ensemble(ensemble, name=name, metric=metric, tags=tags).version)
        done = Registration(f"{name}/{version}")
        mlflow.set_tags({"model.name": name, "model.version": version})
        if promote or force:
            decision = promotion.promote(name, version, metric=metric, mode="max", force=force)
            done.promotion = decision
            decided = "promoted" if decision.promoted else "rejected"
            mlflow.set_tags({"promotion.decision": decided, "promotion.reason": decision.reason[:5000]})
    # mlflow.start_run(run_id=...) ended the parent FINISHED on exit; the caller's finally keeps that status
    return done
