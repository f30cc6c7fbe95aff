"""`bratstune promote --members SRC ... [--metric M] [--force]`: package, register, promote an ensemble.

Steps: resolve each member (a ``fit`` best-model folder, a 32-hex MLflow run id or a ``runs:/``
URI whose ``best_model`` artifact is fetched), optionally read thresholds / post-processing
(``--thresholds``: the ``best_postprocess.yaml`` of a threshold search, or its run id), compute
the training data's fingerprint from ``--data``, build the :class:`bratstune.ensemble.package.Ensemble`,
register it as a new version of ``--name`` (default ``bratstune-<challenge>``) inside an MLflow
run, and move the ``champion`` alias only if the new version beats the current champion on
``--metric`` (``--force`` moves it anyway; that is tagged and logged). Exit code 0 whether or not
the alias moved; the decision is printed and recorded on the version.

``--metric-value`` is the ensemble's validation value of ``--metric`` (cross-validation will pass
its out-of-fold score); by default the mean of the members' recorded values.
``jobs/promote_ensemble.py`` is this command as a job.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml

from bratstune.config_utils import load_yaml
from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
from bratstune.data.fingerprint import training_fingerprint
from bratstune.data.synthetic import generate_cohort
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
    parser.add_argument("--metric", default="val/dice_mean", help="validation metric the gate compares")
    parser.add_argument("--mode", choices=["max", "min"], default="max", help="higher (max) or lower (min) is better")
    parser.add_argument("--metric-value", type=float, help="the ensemble's value of --metric (default: members' mean)")
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
            decision = promote(name, version, metric=args.metric, mode=args.mode, force=args.force)
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
