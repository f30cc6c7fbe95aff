"""The driver's MLflow parent run of a search: what it records, and how a resume finds it again.

The parent run holds the space file, the resolved space and base config, the seed, the data
fingerprint and split, the git commit (tags of :func:`bratstune.tracking.runs.run_tags`), the
objective (tag ``search.objective``, params ``metric`` / ``mode``) and the cohort as a dataset
input (the runs table's Dataset column); each trial's child run points at it with ``mlflow.parentRunId``. Its id is also written next to the
Tune experiment (``bratstune_search.json``) so that ``--resume`` reopens the same run; on remote
storage the ``search.experiment`` tag finds it instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from bratstune.search.data import DataHandle
from bratstune.search.space import SearchSpec
from bratstune.tracking.filters import tag_equals
from bratstune.tracking.runs import log_cohort_input, run_tags

__all__ = [
    "META_FILE",
    "OBJECTIVE_TAG",
    "find_parent_run",
    "objective_text",
    "start_parent_run",
    "stop_all_trial_runs",
    "write_meta",
]

META_FILE = "bratstune_search.json"
#: Parent-run tag: what the search optimises, e.g. ``max val/dice_lesion_mean``.
OBJECTIVE_TAG = "search.objective"


def objective_text(spec: SearchSpec) -> str:
    """``"max val/dice_lesion_mean"`` (several objectives joined by ``, ``)."""
    return ", ".join(f"{mode} {metric}" for metric, mode in spec.objectives)


def _params(spec: SearchSpec, data: DataHandle, algorithm: str | None, scheduler: str | None) -> dict[str, Any]:
    return {
        "space": spec.name,
        "space_file": str(spec.source) if spec.source else "",
        "metric": spec.metric,
        "mode": spec.mode,
        "num_samples": spec.num_samples,
        "max_concurrent_trials": spec.max_concurrent_trials,
        "algorithm": algorithm or spec.search.algorithm,
        "seed": spec.search.seed,
        "scheduler": scheduler or spec.scheduler.type,
        "max_t": spec.max_t,
        "grace_period": spec.scheduler.grace_period,
        "reduction_factor": spec.scheduler.reduction_factor,
        "resources.cpu": spec.resources.cpu,
        "resources.gpu": spec.resources.gpu,
        "max_failures": spec.failure.max_failures,
        "data.root": str(data.root),
        "data.fingerprint": data.fingerprint,
        "data.train_cases": len(data.train_cases),
        "data.val_cases": len(data.val_cases),
        "data.share": spec.data.share,
    }


def start_parent_run(
    client: MlflowClient,
    spec: SearchSpec,
    data: DataHandle,
    *,
    experiment_id: str,
    name: str,
    path: str,
    algorithm: str | None = None,
    scheduler: str | None = None,
) -> str:
    """Create the parent run of search ``name`` (Tune experiment at ``path``); returns its id."""
    extra = {
        "search.experiment": name,
        "search.space": spec.name,
        "search.storage": path,
        "bratstune.kind": "search",
        OBJECTIVE_TAG: objective_text(spec),
    }
    tags = run_tags(data_fingerprint=data.fingerprint, extra=extra)
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    for key, value in _params(spec, data, algorithm, scheduler).items():
        client.log_param(run_id, key, str(value))
    if spec.source is not None and Path(spec.source).is_file():
        client.log_artifact(run_id, str(spec.source), "space")
    client.log_text(run_id, yaml.safe_dump(spec.resolved(), sort_keys=False), "space/resolved_space.yaml")
    client.log_text(run_id, yaml.safe_dump(spec.base_config().to_dict(), sort_keys=False), "space/base_config.yaml")
    split = {"train": [c.case_id for c in data.train_cases], "val": [c.case_id for c in data.val_cases]}
    client.log_text(run_id, json.dumps(split, indent=1), "data/split.json")
    log_cohort_input(
        run_id,
        name=Path(data.root).name,
        fingerprint=data.fingerprint,
        root=data.root,
        cases=len(data.train_cases) + len(data.val_cases),
        profile={"train_cases": len(data.train_cases), "val_cases": len(data.val_cases)},
        client=client,
    )
    return run_id


def write_meta(path: str, meta: Mapping[str, Any]) -> None:
    """``bratstune_search.json`` (parent run id, experiment, store, space) in a local experiment folder."""
    if "://" in path:
        return  # remote storage: the parent run id is found by its MLflow tag instead
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / META_FILE).write_text(json.dumps(dict(meta), indent=1))


def find_parent_run(client: MlflowClient, experiment_id: str, path: str, name: str) -> str | None:
    """The parent run of the experiment being resumed: from ``bratstune_search.json``, else by tag."""
    meta = Path(path) / META_FILE
    if "://" not in path and meta.is_file():
        return json.loads(meta.read_text()).get("parent_run_id")
    runs = client.search_runs([experiment_id], filter_string=tag_equals("search.experiment", name), max_results=1)
    return runs[0].info.run_id if runs else None


def stop_all_trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> int:
    """Mark child runs of ``parent_run_id`` still RUNNING as KILLED (after a hard driver kill)."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], filter_string=tag_equals("mlflow.parentRunId", parent_run_id))
    count = 0
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
            count += 1
    return count
