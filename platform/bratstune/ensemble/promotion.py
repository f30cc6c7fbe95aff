"""The promotion gate: move the alias ``champion`` to a registered version only when it wins like with like.

:func:`promote` compares the candidate with the current champion **on the same held-out cases**:
the gate split recorded with the candidate (``lineage["cases"]`` of its ensemble, a
:class:`~bratstune.data.splits.CaseRecord`), minus every case that either model trained on,
chose its epoch on or tuned its decode settings on. Both ensembles segment those cases from the
raw NIfTI and are scored by the same code (:mod:`bratstune.ensemble.gate`); the candidate is
promoted only when the paired per-case difference in the gate metric (lesion-wise Dice mean by
default) is positive beyond ``GateSpec.margin`` — by default the lower end of its bootstrap 95 %
interval must be. Numbers recorded at registration (in-sample or not) are never compared.

No champion yet: the candidate is promoted. A version without a case record, too few shared
held-out cases, or gate cases that cannot be found: no decision, the champion stays (the
reason says what is missing). ``force=True`` moves the alias regardless; it is tagged
``promotion.forced=true`` and logged as a warning. The replaced champion gets the alias
``previous``.

What is recorded:

* on the candidate version (tags): ``promotion.decision`` (``promoted`` / ``rejected``),
  ``promotion.reason``, ``promotion.time``, ``promotion.forced``, ``promotion.compared_to``,
  and with evidence ``gate.metric``, ``gate.cases``, ``gate.difference``, ``gate.ci_low``,
  ``gate.ci_high``, ``gate.margin``, ``gate.rule``;
* on the candidate's MLflow run: metrics ``gate/cases``, ``gate/candidate``, ``gate/champion``,
  ``gate/difference``, ``gate/ci_low``, ``gate/ci_high``, ``gate/promoted``, and the artifacts
  ``gate/cases.csv`` (one row per case: both scores and the difference) and ``gate/decision.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bratstune.data.layout import discover
from bratstune.data.splits import CaseRecord
from bratstune.ensemble.gate import (
    GateSpec,
    PairedDifference,
    Scorer,
    decide,
    gate_case_ids,
    paired_bootstrap,
    score_ensemble,
)
from bratstune.ensemble.registry import load_ensemble
from bratstune.errors import BratstuneError, DataError

logger = logging.getLogger(__name__)

__all__ = ["CHAMPION", "PREVIOUS", "GateSpec", "Promotion", "PromotionError", "promote", "promotion_summary"]

CHAMPION = "champion"
PREVIOUS = "previous"


class PromotionError(BratstuneError):
    """The promotion gate cannot run (unknown model or version)."""


@dataclass
class Promotion:
    """Outcome of :func:`promote`.

    Attributes:
        value, champion_value: the gate metric's mean over the gate cases (``None`` without evidence).
        evidence: the paired comparison (``None`` when there was none: no champion, forced, undecidable).
        excluded: gate cases that did not count, and why.
    """

    name: str
    version: str
    promoted: bool
    forced: bool
    reason: str
    metric: str
    value: float | None = None
    champion_version: str | None = None
    champion_value: float | None = None
    previous_version: str | None = None
    evidence: PairedDifference | None = None
    excluded: dict[str, str] = field(default_factory=dict)


class _Undecidable(Exception):
    """No paired comparison is possible (the message says why)."""


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _record_of(ensemble: Any, label: str) -> CaseRecord:
    raw = ensemble.lineage.get("cases")
    if not raw:
        raise _Undecidable(
            f"{label} records no case lists (lineage 'cases'), so its held-out cases cannot be checked; "
            "re-register it from a cross-validation (or bratstune promote with case records), or use --force"
        )
    return CaseRecord.from_json(raw)


def _gate_cases(ids: Sequence[str], data_root: str | Path | None, candidate: Any) -> list[Any]:
    root = data_root or candidate.lineage.get("gate_root") or candidate.lineage.get("data_root")
    if not root:
        raise _Undecidable("no data folder for the gate cases: pass data_root (--gate-data DIR)")
    try:
        by_id = {c.case_id: c for c in discover(root).cases}
    except DataError as exc:
        raise _Undecidable(f"gate cases: {exc}") from None
    missing = [c for c in ids if c not in by_id]
    if missing:
        raise _Undecidable(f"{root}: gate case(s) not found: {', '.join(missing[:5])}; pass the right --gate-data DIR")
    return [by_id[c] for c in ids]


def _evidence(
    name: str,
    version: str,
    champion: Any,
    gate: GateSpec,
    *,
    data_root: str | Path | None,
    gate_cases: Sequence[str] | None,
    scorer: Scorer | None,
) -> tuple[PairedDifference, dict[str, str]]:
    """Load both ensembles, pick the shared held-out cases, score both, bootstrap the difference."""
    candidate = load_ensemble(f"models:/{name}/{version}").ensemble
    incumbent = load_ensemble(f"models:/{name}/{champion.version}").ensemble
    ids, excluded = gate_case_ids(
        _record_of(candidate, f"{name} version {version}"),
        _record_of(incumbent, f"the champion ({name} version {champion.version})"),
        override=gate_cases,
    )
    if len(ids) < gate.min_cases:
        raise _Undecidable(
            f"only {len(ids)} held-out gate case(s) neither model trained or tuned on (need {gate.min_cases}; "
            f"{len(excluded)} excluded); record a larger gate split (cross-validation gate_fraction) or use --force"
        )
    cases = _gate_cases(ids, data_root, candidate)
    score = scorer or (lambda ens, cs: score_ensemble(ens, cs, protocol=gate.protocol, tta=gate.tta))
    cand, champ = score(candidate, cases), score(incumbent, cases)
    try:
        a = {c: cand[c][gate.metric] for c in ids}
        b = {c: champ[c][gate.metric] for c in ids}
    except KeyError:
        known = sorted(next(iter(cand.values()), {}))
        raise _Undecidable(f"gate metric {gate.metric!r} is not scored; per-case metrics are {known}") from None
    evidence = paired_bootstrap(
        a, b, metric=gate.metric, mode=gate.mode, confidence=gate.confidence, resamples=gate.resamples, seed=gate.seed
    )
    evidence.extra.update({"margin": gate.margin, "rule": gate.rule, "excluded": excluded})
    return evidence, excluded


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _log_evidence(client: Any, result: Promotion, run_id: str | None, gate: GateSpec) -> dict[str, str]:
    """Log the evidence to the candidate's run; return the version tags that go with it."""
    ev = result.evidence
    tags = {"gate.metric": gate.metric, "gate.margin": repr(float(gate.margin)), "gate.rule": gate.rule}
    summary: dict[str, Any] = {"decision": "promoted" if result.promoted else "rejected", "reason": result.reason}
    if ev is not None:
        tags.update(
            {
                "gate.cases": str(len(ev.cases)),
                "gate.difference": repr(ev.mean),
                "gate.ci_low": repr(ev.low),
                "gate.ci_high": repr(ev.high),
            }
        )
        summary.update(ev.summary())
    if run_id:
        if ev is not None:
            now = int(time.time() * 1000)
            values = {
                "gate/cases": len(ev.cases),
                "gate/candidate": ev.summary()["candidate_mean"],
                "gate/champion": ev.summary()["champion_mean"],
                "gate/difference": ev.mean,
                "gate/ci_low": ev.low,
                "gate/ci_high": ev.high,
                "gate/promoted": float(result.promoted),
            }
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
            client.log_text(run_id, _csv(ev.table()), "gate/cases.csv")
        client.log_text(
            run_id, json.dumps({**summary, "forced": result.forced}, indent=1, default=str), "gate/decision.json"
        )
    return tags


def _record(client: Any, result: Promotion, champion: Any, *, force: bool, gate: GateSpec, run_id: str | None) -> None:
    """Tag the decision (and the evidence) on the candidate; move the aliases when it was promoted."""
    name, version = result.name, result.version
    tags = {
        "promotion.decision": "promoted" if result.promoted else "rejected",
        "promotion.reason": result.reason,
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "promotion.forced": str(bool(force and result.promoted)).lower(),
        "promotion.compared_to": result.champion_version or "",
    }
    tags.update(_log_evidence(client, result, run_id, gate))
    for key, tag in tags.items():
        client.set_model_version_tag(name, version, key, tag[:5000])
    if not result.promoted:
        logger.info("%s version %s not promoted: %s", name, version, result.reason)
        return
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
        result.previous_version = str(champion.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    if force:
        logger.warning("FORCED promotion of %s version %s to %s: %s", name, version, CHAMPION, result.reason)
    else:
        logger.info("promoted %s version %s to %s: %s", name, version, CHAMPION, result.reason)


def promote(
    name: str,
    version: str | int,
    *,
    gate: GateSpec | None = None,
    metric: str | None = None,
    mode: str | None = None,
    force: bool = False,
    data_root: str | Path | None = None,
    gate_cases: Sequence[str] | None = None,
    scorer: Scorer | None = None,
    client: Any = None,
) -> Promotion:
    """Give ``version`` the alias ``champion`` if it beats the champion on shared held-out cases.

    Args:
        name, version: the registered candidate.
        gate: how to decide (:class:`~bratstune.ensemble.gate.GateSpec`; default lesion-wise Dice
            mean, margin 0, the bootstrap interval's lower end must exceed it).
        metric, mode: override ``gate.metric`` / ``gate.mode`` (a recorded name such as
            ``cv/oos/dice_lesion_mean`` means its per-case metric ``dice_lesion_mean``).
        force: move the alias whatever the evidence (recorded as forced).
        data_root: folder holding the gate cases (default: the candidate's ``lineage["gate_root"]``,
            else its ``lineage["data_root"]``).
        gate_cases: case ids to compare on instead of the candidate's recorded gate split
            (cases either model used are still dropped).
        scorer: ``scorer(ensemble, cases) -> {case_id: {metric: value}}`` (default
            :func:`~bratstune.ensemble.gate.score_ensemble`).
        client: an ``MlflowClient`` (default one for the current tracking URI).

    Raises:
        PromotionError: the model or version does not exist.
    """
    gate = (gate or GateSpec()).with_metric(metric, mode)
    client = client if client is not None else MlflowClient()
    version = str(version)
    try:
        candidate_version = client.get_model_version(name, version)
    except MlflowException:
        raise PromotionError(
            f"{name} version {version} is not registered; `bratstune models list` shows versions"
        ) from None
    champion = _alias_version(client, name, CHAMPION)
    result = Promotion(name, version, False, bool(force), "", gate.metric)
    if champion is None:
        result.promoted, result.reason = True, "no champion yet"
        _record(client, result, None, force=False, gate=gate, run_id=candidate_version.run_id)
        result.forced = False
        return result
    result.champion_version = str(champion.version)
    if result.champion_version == version:
        result.reason = f"version {version} already is the champion"
        return result
    try:
        result.evidence, result.excluded = _evidence(
            name, version, champion, gate, data_root=data_root, gate_cases=gate_cases, scorer=scorer
        )
        summary = result.evidence.summary()
        result.value, result.champion_value = summary["candidate_mean"], summary["champion_mean"]
        result.promoted, result.reason = decide(result.evidence, gate)
    except _Undecidable as exc:
        result.reason = f"no like-with-like comparison with v{champion.version}: {exc}"
    if not result.promoted and force:
        result.promoted, result.reason = True, f"forced: {result.reason}"
    result.forced = bool(force) and result.reason.startswith("forced")
    _record(client, result, champion, force=result.forced, gate=gate, run_id=candidate_version.run_id)
    return result


def promotion_summary(p: Promotion) -> str:
    """One line for logs and the CLI."""
    state = "PROMOTED" if p.promoted else "kept champion"
    out = {
        "decision": state,
        "name": p.name,
        "version": p.version,
        "forced": p.forced,
        "reason": p.reason,
        "previous": p.previous_version,
    }
    if p.evidence is not None:
        out["gate"] = {k: v for k, v in p.evidence.summary().items() if k != "excluded"}
    return json.dumps(out, default=str)
