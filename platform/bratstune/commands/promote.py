"""`bratstune promote --members SRC ... [--metric M] [--force]`: package, register, promote an ensemble.

Steps: resolve each member (a ``fit`` best-model folder, a 32-hex MLflow run id or a ``runs:/``
URI whose ``best_model`` artifact is fetched), optionally read thresholds / post-processing
(``--thresholds``: the ``best_postprocess.yaml`` of a threshold search, or its run id), compute
the training data's fingerprint from ``--data``, build the :class:`bratstune.ensemble.package.Ensemble`,
register it as a new version of ``--name`` (default ``bratstune-<challenge>``) inside an MLflow
run, and move the ``champion`` alias only if the new version beats the current champion **on the
same held-out cases** (:mod:`bratstune.ensemble.promotion`: both models segment the gate cases,
the paired per-case difference in ``--gate-metric`` must be positive beyond ``--gate-margin``,
with a bootstrap 95 % interval). ``--force`` moves it anyway; that is tagged and logged. Exit
code 0 whether or not the alias moved; the decision is printed and recorded on the version.

The gate needs to know which cases the new ensemble used. Each member's case record
(``cases.json``: next to a fit output folder, in a CV fold folder, or on the member's MLflow run
or its parent) gives the cases it trained and selected on; ``--tuned-on FILE`` (a JSON list of
ids) names the cases ``--thresholds`` were tuned on. The gate split is ``--gate-cases FILE``, or
every labelled case in ``--gate-data`` (default ``--data``) that the ensemble did not use. When a
record is missing, the version is registered without case lists and the gate cannot compare it
(``--force`` still can).

``--metric`` / ``--metric-value`` are the recorded headline number (default the members' mean of
``--metric``); the gate never compares them. ``jobs/promote_ensemble.py`` is this command as a job.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException

from bratstune.config_utils import load_yaml
from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
from bratstune.data.fingerprint import training_fingerprint
from bratstune.data.layout import discover
from bratstune.data.splits import CASES_FILE, CaseRecord
from bratstune.data.synthetic import generate_cohort
from bratstune.ensemble.gate import GateSpec
from bratstune.ensemble.member import Member
from bratstune.ensemble.package import Ensemble
from bratstune.ensemble.promotion import Promotion, promote
from bratstune.ensemble.registry import default_model_name, register_ensemble, resolve_member_source
from bratstune.errors import ConfigError, DataError
from bratstune.inference.decode import DecodeSettings
from bratstune.inference.sliding_window import InferenceConfig
from bratstune.labels import get_scheme, scheme_for
from bratstune.tracking.artifacts import resolve_artifact
from bratstune.tracking.runs import git_commit, log_config, setup_mlflow, start_run
from bratstune.training.fit import fit

TTA_CHOICES = {"none": (False, False), "flips": (True, False), "flips+rot90": (True, True)}

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members",
        nargs="+",
        default=[],
        metavar="RUN_ID_OR_DIR",
        help="trained models: fit best-model folders, MLflow run ids or runs:/ URIs",
    )
    parser.add_argument("--name", help="registered model name (default bratstune-<challenge>)")
    parser.add_argument("--challenge", help="GLI, PED, ... (default: the members' config, else GLI)")
    parser.add_argument("--scheme", help="label scheme name (default: from the challenge)")
    parser.add_argument("--metric", default="val/dice_mean", help="the recorded headline metric (not compared)")
    parser.add_argument("--metric-value", type=float, help="the ensemble's value of --metric (default: members' mean)")
    parser.add_argument("--gate-metric", default="dice_lesion_mean", help="per-case metric the gate compares")
    parser.add_argument(
        "--mode", choices=["max", "min"], default="max", help="--gate-metric: higher or lower is better"
    )
    parser.add_argument("--gate-margin", type=float, default=0.0, help="how much the candidate must win by")
    parser.add_argument(
        "--gate-rule",
        choices=["lower_bound", "mean"],
        default="lower_bound",
        help="promote when the 95%% interval's lower end (default) or the mean difference exceeds the margin",
    )
    parser.add_argument("--gate-cases", type=Path, help="JSON list of held-out gate case ids")
    parser.add_argument("--gate-data", type=Path, help="cohort holding the gate cases (default --data)")
    parser.add_argument("--gate-tta", choices=["own", "none"], default="own", help="test-time views while gating")
    parser.add_argument("--tuned-on", type=Path, help="JSON list of the case ids --thresholds were tuned on")
    parser.add_argument("--thresholds", help="YAML with thresholds/postprocess, or a threshold-search run id")
    parser.add_argument("--data", type=Path, help="training cohort: records its intensity fingerprint for drift checks")
    parser.add_argument("--tta", choices=sorted(TTA_CHOICES), default="flips", help="test-time augmentation")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    parser.add_argument("--roi-size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="window (default: patch size)")
    parser.add_argument("--search-run", help="lineage: MLflow run id of the search the members come from")
    parser.add_argument("--cv-run", help="lineage: MLflow run id of the cross-validation")
    parser.add_argument("--force", action="store_true", help="promote even if it does not beat the champion (logged)")
    parser.add_argument("--no-promote", action="store_true", help="register only; leave the aliases alone")
    parser.add_argument("--experiment", default="bratstune-registry", help="MLflow experiment of the registration run")
    parser.add_argument("--smoke-test", action="store_true", help="train two tiny members on a synthetic cohort first")


def _decode(source: str | None) -> DecodeSettings | None:
    """``--thresholds``: a YAML file with ``thresholds`` / ``postprocess`` (other keys ignored), or a run id.

    A run id (or ``runs:/`` URI) is a threshold search's run: its ``best_postprocess.yaml``.
    """
    if not source:
        return None
    resolved = resolve_artifact(source, default_artifact="best_postprocess.yaml", what="thresholds")
    try:
        if not resolved.path.is_file():
            raise DataError(resolved.path, "--thresholds: expected a YAML file (or a threshold-search run id)")
        data = yaml.safe_load(resolved.path.read_text()) or {}
    finally:
        resolved.cleanup()
    if not isinstance(data, dict):
        raise DataError(resolved.path, "--thresholds: expected a mapping with 'thresholds' and 'postprocess'")
    return DecodeSettings.from_mapping({k: data[k] for k in ("thresholds", "postprocess") if data.get(k)})


def _source_record(source: str, folder: Path) -> CaseRecord | None:
    """A member's case record: ``cases.json`` near its folder, or on its MLflow run (or that run's parent)."""
    for candidate in (folder / CASES_FILE, folder.parent / CASES_FILE):
        if candidate.is_file():
            return CaseRecord.from_json(candidate.read_text(), source=candidate)
    if not re.fullmatch(r"[0-9a-f]{32}", str(source)):
        return None
    client = mlflow.MlflowClient()
    run_ids = [str(source)]
    try:
        parent = client.get_run(str(source)).data.tags.get("mlflow.parentRunId")
    except MlflowException:
        parent = None
    if parent:
        run_ids.append(parent)
    for run_id in run_ids:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CASES_FILE)
        except (MlflowException, OSError):
            continue
        return CaseRecord.from_json(Path(path).read_text(), source=path)
    return None


def _read_ids(path: Path, what: str) -> list[str]:
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(path, f"{what}: cannot read a JSON list of case ids ({exc})") from None
    if isinstance(ids, dict):
        ids = ids.get("gate")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(path, f"{what}: expected a JSON list of case ids")
    return ids


def case_record(
    args: argparse.Namespace, sources: list[str], folders: list[Path], data: Path | None
) -> CaseRecord | None:
    """The new ensemble's case record, or ``None`` (with a warning) when a part of it is unknown."""
    records = [_source_record(s, f) for s, f in zip(sources, folders)]
    if any(r is None for r in records):
        missing = [s for s, r in zip(sources, records) if r is None]
        logger.warning("no case record for member(s) %s: the gate cannot compare this version", missing)
        return None
    if args.thresholds and not args.tuned_on:
        logger.warning(
            "--thresholds without --tuned-on: the decode's tuning cases are unknown; the gate cannot compare"
        )
        return None
    record = CaseRecord(
        trained=sorted({c for r in records for c in r.trained}),
        selected=sorted({c for r in records for c in r.selected}),
        tuned=sorted(
            {c for r in records for c in r.tuned} | set(_read_ids(args.tuned_on, "--tuned-on") if args.tuned_on else [])
        ),
    )
    gate_root = args.gate_data or data
    if args.gate_cases:
        record.gate = sorted(_read_ids(args.gate_cases, "--gate-cases"))
    elif gate_root is not None:
        labelled = [c.case_id for c in discover(gate_root).cases if c.label is not None]
        record.gate = sorted(set(labelled) - record.used)
    return record


def _smoke_members(tmp: Path) -> tuple[list[Path], Path]:
    generate_cohort(tmp / "data", challenge="GLI", cases=6, shape=(32, 32, 32), anatomy="procedural", workers=1)
    prepared = prepare_cohort(tmp / "data", preprocess_config({}), cache_root=tmp / "cache")
    folders = []
    for seed in (0, 1):
        config = {
            "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
            "data": {"patch_size": 24, "num_workers": 0},
            "epochs": 1,
            "steps_per_epoch": 4,
            "seed": seed,
            "device": "cpu",
            "amp": "off",
            "challenge": "GLI",
            "validation": {"lesion_metrics": False},
        }
        split = split_train_val(prepared.cases, scheme_for("GLI"), val_fraction=0.2, seed=seed)
        result = fit(config, split, out_dir=tmp / f"member{seed}")
        record = CaseRecord(trained=[c.case_id for c in split.train], selected=[c.case_id for c in split.val])
        record.write(tmp / f"member{seed}" / CASES_FILE)  # as bratstune train records it
        folders.append(result.best_dir)
    return folders, tmp / "data"


def _metrics(args: argparse.Namespace, members: list[Member]) -> dict[str, float]:
    """``--metric`` (given, or the members' mean) and the members' mean of every ``val/`` metric."""
    values = [m.metrics[args.metric] for m in members if args.metric in m.metrics]
    if args.metric_value is not None:
        value = float(args.metric_value)
    elif values:
        value = float(sum(values) / len(values))
    else:
        raise ConfigError(f"no member records {args.metric!r}; pass --metric-value or choose another --metric")
    metrics = {args.metric: value}
    for key in sorted({k for m in members for k in m.metrics if k.startswith("val/")}):
        vals = [m.metrics[key] for m in members if key in m.metrics]
        metrics.setdefault(f"members_mean/{key}", float(sum(vals) / len(vals)))
    return metrics


def _lineage(args: argparse.Namespace, sources: list[str]) -> dict[str, str]:
    lineage = {"members": ",".join(sources)}
    for key, value in (
        ("search_run_id", args.search_run),
        ("cv_run_id", args.cv_run),
        ("thresholds", args.thresholds),
        ("git_commit", git_commit().get("commit")),
    ):
        if value:
            lineage[key] = value
    return lineage


def build(args: argparse.Namespace, workdir: Path) -> Ensemble:
    """The :class:`Ensemble` described by the arguments (members fetched into ``workdir``)."""
    sources = list(args.members)
    data = args.data
    if args.smoke_test and not sources:
        folders, smoke_data = _smoke_members(workdir / "smoke")
        sources = [str(f) for f in folders]
        data = data or smoke_data
    if not sources:
        raise ConfigError("--members: give at least one trained model (folder, run id or runs:/ URI)")
    folders = [resolve_member_source(s, dst=workdir / f"member{i}") for i, s in enumerate(sources)]
    first = load_yaml(folders[0] / "config.yaml")
    challenge = (args.challenge or first.get("challenge") or "GLI").upper()
    scheme = get_scheme(args.scheme) if args.scheme else scheme_for(challenge)
    members = [Member.from_folder(f, scheme, name=_member_name(s, f)) for s, f in zip(sources, folders)]
    metrics = _metrics(args, members)
    decode = _decode(args.thresholds)
    lineage = _lineage(args, sources)
    fingerprint: dict[str, Any] = {}
    if data is not None:
        prepared = prepare_cohort(Path(data), preprocess_config(dict(members[0].spec.preprocess)))
        fingerprint = training_fingerprint(c.fingerprint for c in prepared.cases)
        lineage["data_fingerprint"] = prepared.fingerprint
        lineage["data_root"] = str(Path(data).absolute())
    if args.gate_data is not None:
        lineage["data_root"] = str(Path(args.gate_data).absolute())  # where the gate finds its cases
    record = case_record(args, sources, folders, data)
    if record is not None:
        lineage["cases"] = record.dumps()
    flips, rotate = TTA_CHOICES[args.tta]
    inference = InferenceConfig(
        roi_size=tuple(args.roi_size) if args.roi_size else None, overlap=args.overlap, flips=flips, rotate90=rotate
    )
    return Ensemble.from_members(
        members,
        scheme=scheme,
        challenge=challenge,
        inference=inference,
        decode=decode,
        training_fingerprint=fingerprint,
        lineage=lineage,
        metrics=metrics,
    )


def _member_name(source: str, folder: Path) -> str:
    text = str(source)
    if re.fullmatch(r"[0-9a-f]{32}", text):
        return text[:8]
    return folder.parent.name if folder.name == "best" else folder.name


def _print_decision(name: str, version: str, decision: Promotion) -> None:
    if decision.promoted:
        extra = f"; v{decision.previous_version} is now 'previous'" if decision.previous_version else ""
        forced = "FORCED: " if decision.forced else ""
        print(f"{forced}{name}@champion -> version {version} ({decision.reason}){extra}")
    else:
        print(f"{name}@champion unchanged (v{decision.champion_version}): {decision.reason}")


def run(args: argparse.Namespace) -> int:
    experiment_id = setup_mlflow(args.experiment)
    with tempfile.TemporaryDirectory(prefix="bratstune-promote-") as tmp:
        ensemble = build(args, Path(tmp))
        name = args.name or default_model_name(ensemble.challenge)
        print(f"ensemble: {ensemble.describe()}")
        tags = {"bratstune.kind": "promote_ensemble", "model.name": name, "promotion.force": args.force}
        with start_run(
            run_name=f"register-{name}-{time.strftime('%H%M%S')}",
            experiment_id=experiment_id,
            tags=tags,
            data_fingerprint=ensemble.lineage.get("data_fingerprint"),
        ) as run:
            log_config(
                {
                    "members": list(args.members),
                    "metric": args.metric,
                    "gate_metric": args.gate_metric,
                    "gate_margin": args.gate_margin,
                    "gate_rule": args.gate_rule,
                    "mode": args.mode,
                    "tta": args.tta,
                    "overlap": args.overlap,
                    "force": args.force,
                    "thresholds": ensemble.thresholds,
                }
            )
            mlflow.log_metrics(dict(ensemble.metrics))
            version = str(register_ensemble(ensemble, name=name, metric=args.metric).version)
            print(f"registered {name} version {version} ({args.metric} = {ensemble.metrics[args.metric]:.4f})")
            if args.no_promote:
                return 0
            gate = GateSpec(
                metric=args.gate_metric,
                mode=args.mode,
                margin=args.gate_margin,
                rule=args.gate_rule,
                tta=None if args.gate_tta == "own" else False,
            )
            decision = promote(name, version, gate=gate, force=args.force, data_root=args.gate_data)
            mlflow.set_tags(
                {
                    "promotion.decision": "promoted" if decision.promoted else "rejected",
                    "promotion.reason": decision.reason,
                    "promotion.forced": str(decision.forced and decision.promoted).lower(),
                    "model.version": version,
                }
            )
            run_id = run.info.run_id
    _print_decision(name, version, decision)
    print(f"MLflow run {run_id}")
    return 0
