"""Stages 5 and 6, packaging and registration: the fold models become one ensemble, maybe the champion.

The fold models become the members of an :class:`bratstune.ensemble.package.Ensemble` with the
deployed decode settings, the training fingerprint (:func:`bratstune.data.fingerprint.training_fingerprint`),
lineage (``cv_run_id``, ``search_run_id``, data fingerprint and root, git commit, and ``cases``:
the :class:`~bratstune.data.splits.CaseRecord` of what the ensemble trained, selected and tuned on
and its held-out gate split) and metrics (``cv/oos/dice_lesion_mean`` = the cross-fitted
estimate, :data:`DEFAULT_METRIC`; ``cv/in_sample/...``, ``cv/default/...``, per fold); saved to
``<out>/ensemble`` and, when the spec names a model, registered in the CV parent run and passed
through the promotion gate (:mod:`bratstune.ensemble.promotion`), which compares it with the
champion on the gate cases, never on these recorded numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

from bratstune.data.fingerprint import training_fingerprint
from bratstune.data.splits import CaseRecord
from bratstune.ensemble import promotion, registry
from bratstune.ensemble.gate import GateSpec
from bratstune.ensemble.member import Member
from bratstune.ensemble.package import Ensemble
from bratstune.metrics.volumes import oof_statistics
from bratstune.search.crossval.decode_tuning import DecodeTuning
from bratstune.search.crossval.fold_trials import BEST_DIR, FOLDS_DIR
from bratstune.search.crossval.folds import FoldPlan
from bratstune.search.crossval.oof import load_oof
from bratstune.search.crossval.parent_run import prefixed
from bratstune.tracking.runs import git_commit

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_METRIC", "Registration", "build_ensemble", "case_record", "register"]

#: The ensemble's headline metric: pooled cross-fitted (out-of-sample) lesion-wise Dice. The
#: promotion gate does not compare it; it scores both models on the gate cases.
DEFAULT_METRIC = "cv/oos/dice_lesion_mean"


def _metrics(tuning: DecodeTuning) -> dict[str, float]:
    metrics = {
        **prefixed("cv/oos/", tuning.oos),
        **prefixed("cv/", tuning.oos),
        **prefixed("cv/in_sample/", tuning.in_sample),
        **prefixed("cv/default/", tuning.default),
    }
    for i, (fold, oos) in enumerate(zip(tuning.fold_metrics, tuning.fold_oos)):
        metrics.update(prefixed(f"cv/fold{i}/", {m: v for m, v in fold.items() if m.endswith("_mean")}))
        metrics.update(prefixed(f"cv/fold{i}/oos/", {m: v for m, v in oos.items() if m.endswith("_mean")}))
    if DEFAULT_METRIC not in metrics and "cv/oos/dice_mean" in metrics:
        logger.warning("no lesion-wise metric (unknown challenge): %s is not recorded", DEFAULT_METRIC)
    return metrics


def case_record(plan: FoldPlan, tuning: DecodeTuning) -> tuple[CaseRecord, list[CaseRecord]]:
    """The ensemble's case record and each fold model's (trained, selected, decode tuned on, gate).

    The deployed decode settings were tuned on every CV case; fold k's cross-fitted settings on
    the other folds' cases only.
    """
    folds = []
    for k in range(plan.k):
        record = plan.fold_record(k)
        record.tuned = list(tuning.fold_tuned_on[k])
        folds.append(record)
    ensemble = CaseRecord(
        trained=sorted({c for r in folds for c in r.trained}),
        selected=sorted({c for r in folds for c in r.selected}),
        tuned=plan.cv_ids,
        gate=plan.gate_ids,
        extra={"selection_mode": plan.selection_mode},
    )
    return ensemble, folds


def _lineage(plan: FoldPlan, cv_run_id: str, search_run_id: str | None, cases: CaseRecord) -> dict[str, str]:
    prepared = plan.prepared
    lineage = {
        "cv_run_id": cv_run_id,
        "data_fingerprint": prepared.fingerprint,
        "data_root": str(Path(prepared.root).absolute()),
        "folds": str(plan.k),
        "cases": cases.dumps(),
    }
    if plan.gate_root is not None:
        lineage["gate_root"] = str(plan.gate_root)  # where the promotion gate finds the gate cases
    if search_run_id:
        lineage["search_run_id"] = search_run_id
    commit = git_commit().get("commit")
    if commit:
        lineage["git_commit"] = commit
    return lineage


def _oof_statistics(out_dir: Path, plan: FoldPlan, tuning: DecodeTuning) -> dict[str, Any]:
    """Predicted volumes and lesion counts of the out-of-fold cases under the deployed decode: what
    batch prediction compares a new cohort with (plausibility flags)."""
    oof = [case for fold in range(plan.k) for case in load_oof(out_dir, plan.held_out_cases(fold))]
    labels = (tuning.settings.decode_regions(case.probs, plan.scheme) for case in oof)
    return oof_statistics(labels, [case.spacing for case in oof], scheme=plan.scheme)


def build_ensemble(
    out_dir: Path,
    plan: FoldPlan,
    tuning: DecodeTuning,
    *,
    cv_run_id: str,
    search_run_id: str | None = None,
    inference: Mapping[str, Any] | None = None,
) -> Ensemble:
    """The fold models (``<out>/folds/fold<i>/best_model``) as one ensemble with the deployed decode."""
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
        oof_statistics=_oof_statistics(out_dir, plan, tuning),
        lineage=_lineage(plan, cv_run_id, search_run_id, case_record(plan, tuning)[0]),
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
    ensemble: Ensemble,
    name: str,
    *,
    parent_run_id: str,
    metric: str,
    promote: bool,
    force: bool,
    gate: GateSpec | None = None,
) -> Registration:
    """Register the ensemble in the CV parent run and (optionally) pass it through the promotion gate.

    The gate scores the candidate and the champion on the candidate's recorded gate split
    (``lineage["cases"]``), with the cohort at ``lineage["data_root"]``.
    """
    cases = CaseRecord.from_json(ensemble.lineage.get("cases") or "{}")
    with mlflow.start_run(run_id=parent_run_id):
        tags = {
            "cv_run_id": parent_run_id,
            "cases.gate": len(cases.gate),
            "cases.trained": len(cases.trained),
            "cases.selected": len(cases.selected),
            "cases.tuned": len(cases.tuned),
        }
        version = str(registry.register_ensemble(ensemble, name=name, metric=metric, tags=tags).version)
        done = Registration(f"{name}/{version}")
        mlflow.set_tags({"model.name": name, "model.version": version})
        if promote or force:
            decision = promotion.promote(name, version, gate=gate, force=force)
            done.promotion = decision
            decided = "promoted" if decision.promoted else "rejected"
            mlflow.set_tags(
                {
                    "promotion.decision": decided,
                    "promotion.reason": decision.reason[:5000],
                    "promotion.forced": str(decision.forced).lower(),
                }
            )
    # mlflow.start_run(run_id=...) ended the parent FINISHED on exit; the caller's finally keeps that status
    return done
