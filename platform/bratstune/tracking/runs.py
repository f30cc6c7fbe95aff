"""MLflow set-up and logging helpers shared by every job.

* :func:`tracking_uri`: ``$MLFLOW_TRACKING_URI``, else the server ``bratstune up`` started
  (:func:`bratstune.paths.endpoints`), else the embedded SQLite store
  ``sqlite:///<abs BRATSTUNE_HOME>/mlflow.db`` (``./.bratstune/mlflow.db``).
* :func:`setup_mlflow`: creates the store's schema **once, in the driver** (a brand-new SQLite
  database created by several processes at once breaks), then gets or creates the experiment
  with an **absolute** artifact location (``<home>/mlartifacts`` next to the database), so
  artifacts never land in a throw-away working directory (Ray jobs).
* :func:`start_run`: context manager that starts a (child) run and tags it with the git commit,
  package versions, hardware and the data fingerprint; the run ends FINISHED on success or on
  ``SystemExit`` (how Ray Tune stops a trial), KILLED on ``KeyboardInterrupt``, FAILED otherwise.
* :func:`log_config`: nested config → flat ``a.b.c`` params, plus the YAML as an artifact.
* :func:`log_cohort_input`: the cohort a run trained on, as an MLflow dataset input (the runs
  table's Dataset column): named after the cohort, digest = data fingerprint, case counts in its profile.
* :func:`experiment_link`: where to look at an experiment: a link that opens the UI on the
  training-runs table (``?workflowType=machine_learning``; MLflow 3 opens the GenAI view otherwise).

The ``fit`` reporter that logs epochs to MLflow lives in the search layer
(:class:`bratstune.search.reporter.MlflowReporter`): tracking knows nothing of training.

Nothing here runs at import: no store is opened until a function is called.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from bratstune import paths
from bratstune.config_utils import to_dict
from bratstune.device import hardware_summary
from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ARTIFACT_DIR",
    "DB_FILE",
    "EXPERIMENT_KIND",
    "experiment_link",
    "flatten",
    "git_commit",
    "log_cohort_input",
    "log_config",
    "package_versions",
    "run_tags",
    "setup_mlflow",
    "start_run",
    "tracking_uri",
    "check_reachable",
]

DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
PACKAGES = ("bratstune", "torch", "monai", "mlflow", "ray", "optuna", "numpy", "torchio", "nibabel", "scipy")
PARAM_VALUE_LIMIT = 6000
#: Experiment tag (and value) with which MLflow 3 records an experiment as model training, not GenAI.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: Port ``mlflow ui`` serves on by default, for the hint printed with a local store.
UI_PORT = 5000
#: Seconds the reachability probe of an ``http(s)://`` tracking server waits (MLflow itself retries for minutes).
PROBE_TIMEOUT_S = 5.0


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the server ``bratstune up`` runs, else ``sqlite:///<abs home>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    served = paths.endpoints().get("MLFLOW_TRACKING_URI")
    if served:
        return served
    return f"sqlite:///{paths.home() / DB_FILE}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_location(uri: str) -> str | None:
    """Absolute artifact root for a SQLite store (``mlartifacts`` next to the database).

    ``None`` for servers (``http(s)://``, ``databricks``): the server decides.
    """
    db = _sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / ARTIFACT_DIR).as_uri()


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`ConfigError` (one line) unless an ``http(s)://`` tracking server answers within ``timeout`` s.

    Any HTTP answer counts (a proxy may refuse ``/health``); only no answer at all fails. Other
    URIs (SQLite, ``databricks``) are not probed. MLflow's own client retries an unreachable
    server for about 5 minutes before its traceback: this says so in seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    # Deferred: only server URIs need it.
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310 (http(s) only)
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it (`bratstune up`) "
            "or point MLFLOW_TRACKING_URI at a running server (unset it for the local SQLite store)"
        ) from None


def setup_mlflow(experiment: str = "bratstune", *, uri: str | None = None) -> str:
    """Point MLflow at the store, create its schema once and return the experiment id.

    Call in the driver before starting any trial/worker process.

    Args:
        experiment: experiment name (created if missing).
        uri: tracking URI; default :func:`tracking_uri`.
    """
    uri = uri or tracking_uri()
    check_reachable(uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)  # creates/migrates the schema in this process only
    found = client.get_experiment_by_name(experiment)
    if found is None:
        location = artifact_location(uri)
        if location is not None:
            Path(location[len("file://") :]).mkdir(parents=True, exist_ok=True)
        try:
            experiment_id = client.create_experiment(
                experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        except MlflowException:  # created concurrently by another driver
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    else:
        experiment_id = found.experiment_id
        if found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # created before the tag existed
            client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    logger.info("MLflow: %s, experiment %r (id %s)", uri, experiment, experiment_id)
    return str(experiment_id)


# -- run metadata ---------------------------------------------------------------------------------


def _repo_candidates() -> list[Path]:
    package_root = Path(__file__).resolve().parents[2]
    return [package_root, Path.cwd()]


def git_commit() -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}`` of the source checkout, or ``{}`` outside git."""
    for root in _repo_candidates():
        try:
            sha = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if sha:
            return {"commit": sha, "dirty": "true" if status else "false"}
    return {}


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a result."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def run_tags(*, data_fingerprint: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags every run carries: git commit, package versions, hardware, data fingerprint."""
    tags: dict[str, str] = {}
    git = git_commit()
    if git:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["git.commit"] = git["commit"]
        tags["git.dirty"] = git["dirty"]
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    tags.update({f"hardware.{k}": str(v) for k, v in hardware_summary().items()})
    if data_fingerprint:
        tags["data.fingerprint"] = data_fingerprint
    tags.update({str(k): str(v) for k, v in (extra or {}).items()})
    return tags


@contextlib.contextmanager
def start_run(
    *,
    run_name: str | None = None,
    experiment_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    data_fingerprint: str | None = None,
    config: Any = None,
    run_id: str | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run tagged with commit, versions, hardware and data fingerprint.

    Args:
        run_name: display name.
        experiment_id: from :func:`setup_mlflow` (default: the active experiment).
        parent_run_id: makes this a child run (works across processes, unlike ``nested=True``).
        tags: extra tags.
        data_fingerprint: see :func:`data_fingerprint`.
        config: when given, logged with :func:`log_config`.
        run_id: reopen this existing run (e.g. a trial resumed after a crash) instead of a new one.
        nested: nest under the run active in this process (``parent_run_id`` works across processes).

    Yields:
        The active run. It ends FINISHED on success or ``SystemExit``, KILLED on
        ``KeyboardInterrupt``, FAILED on any other exception (which propagates).
    """
    run = mlflow.start_run(
        run_id=run_id,
        nested=nested,
        run_name=run_name,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        tags=run_tags(data_fingerprint=data_fingerprint, extra=tags),
    )
    status = "FINISHED"
    try:
        if config is not None:
            log_config(config)
        yield run
    except SystemExit:
        raise
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status=status)


# -- config and metrics -----------------------------------------------------------------------------


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"loss": {"weights": {"dice": 1}}}`` → ``{"loss.weights.dice": "1"}`` (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (Mapping, list, tuple)):
            out[name] = json.dumps(to_dict(value), default=str)
        else:
            out[name] = str(value)
    return {k: (v if len(v) <= PARAM_VALUE_LIMIT else v[: PARAM_VALUE_LIMIT - 3] + "...") for k, v in out.items()}


def log_config(config: Any, *, artifact_file: str = "config.yaml", run_id: str | None = None) -> dict[str, str]:
    """Log a (dataclass or mapping) config as flat params and as a YAML artifact.

    Returns:
        The flat params that were logged.
    """
    plain = to_dict(config) if is_dataclass(config) else to_dict(dict(config))
    params = flatten(plain)
    client = mlflow.tracking.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit for params
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_text(run_id, yaml.safe_dump(plain, sort_keys=False), artifact_file)
    return params


def log_cohort_input(
    run_id: str,
    *,
    name: str,
    fingerprint: str,
    root: str | Path,
    cases: int,
    profile: Mapping[str, Any] | None = None,
    context: str = "training",
    client: MlflowClient | None = None,
) -> None:
    """Record the cohort a run trained on as an MLflow dataset input (the runs table's Dataset column).

    Args:
        run_id: the run.
        name: the dataset's name: the cohort (its folder name, e.g. ``BraTS-GLI``).
        fingerprint: :func:`bratstune.data.fingerprint.data_fingerprint` of its cases and
            preprocessing, the dataset's digest (MLflow stores at most 36 characters).
        root: the cohort folder (the dataset's source).
        cases: number of cases the run used (``num_cases`` of the profile).
        profile: more counts for the profile (``train_cases``, ``val_cases``, ``fold`` ...).
        context: the input's ``mlflow.data.context`` tag (``training``, ``evaluation``).
        client: the client to log with (default one for the current tracking URI).
    """
    dataset = Dataset(
        name=str(name),
        digest=str(fingerprint)[:36],
        source_type="local",
        source=json.dumps({"uri": str(root)}),
        profile=json.dumps({"num_cases": int(cases), **dict(profile or {})}, default=str),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    (client or MlflowClient()).log_inputs(run_id, datasets=[DatasetInput(dataset, tags=tags)])


def experiment_link(uri: str, experiment_id: str) -> str:
    """Where to compare an experiment's runs: a link that opens the MLflow UI on its runs table.

    A server (``http(s)://``) gets ``<server>/#/experiments/<id>?workflowType=machine_learning``
    (the query switches a fresh browser from MLflow 3's default GenAI view to the training runs);
    a local store gets the ``mlflow ui`` command that serves it, then that link on its default port.
    """
    route = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{route}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:{UI_PORT}/{route}"
