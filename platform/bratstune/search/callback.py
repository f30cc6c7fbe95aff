"""Driver-side Ray Tune callback that closes each trial's MLflow child run with its stop reason.

Kept apart from :mod:`bratstune.search.tune` and :mod:`bratstune.search.trial` because it
subclasses ``ray.tune.Callback`` at import time (Tune pickles callbacks into the experiment state,
so the class must live at module level).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from bratstune.tracking.filters import tag_equals
from bratstune.tracking.outage import (
    flush_timeout,
    quick_requests,
    replay_unsent,
    server_reachable,
    wait_for_server,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

__all__ = ["STOP_TAG", "TRIAL_TAG", "TrialRunCallback", "close_trial_run", "find_trial_run", "replay_outage"]

TRIAL_TAG = "ray_trial_id"
STOP_TAG = "stop_reason"
#: Sub-folder of a spool folder with the trial closes a dead server missed.
CLOSES = "closes"


def find_trial_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow child run of ``trial_id`` under ``parent_run_id`` (by its ``ray_trial_id`` tag)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"{tag_equals(TRIAL_TAG, trial_id)} and {tag_equals('mlflow.parentRunId', parent_run_id)}",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def close_trial_run(
    client: Any, experiment_id: str, parent_run_id: str, trial_id: str, status: str, reason: str
) -> None:
    """Tag the trial's child run with why it ended and end it (``FAILED``, or ``status`` if still running)."""
    run_id = find_trial_run(client, experiment_id, parent_run_id, trial_id)
    if run_id is None:
        logger.warning("trial %s has no MLflow run to close", trial_id)
        return
    client.set_tag(run_id, STOP_TAG, reason[:5000])
    client.set_tag(run_id, "ray_trial_status", "ERROR" if status == "FAILED" else "TERMINATED")
    if status == "FAILED" or client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def replay_outage(tracking_uri: str, experiment_id: str, parent_run_id: str, spool_dir: str | None) -> dict[str, int]:
    """At the end of a Tune experiment: send what its trials and :class:`TrialRunCallback` kept during an outage.

    Waits (bounded, :func:`bratstune.tracking.outage.flush_timeout`) for the tracking server,
    sends every trial's kept queue, then closes the runs whose close was missed.

    Returns:
        What is still not logged, by kind (kept in ``spool_dir``; an ERROR line says so).
    """
    folder = Path(spool_dir) if spool_dir else None
    if folder is None or not folder.is_dir() or not any(folder.rglob("*.json")):
        return {}
    if not wait_for_server(tracking_uri, flush_timeout()):
        logger.error(
            "MLflow tracking server %s is still unreachable: what it missed is kept in %s", tracking_uri, folder
        )
        return {"files": sum(1 for _ in folder.rglob("*.json"))}
    lost = replay_unsent(folder)
    client = MlflowClient(tracking_uri)
    for path in sorted((folder / CLOSES).glob("*.json")):
        entry = json.loads(path.read_text())
        close_trial_run(client, experiment_id, parent_run_id, entry["trial_id"], entry["status"], entry["reason"])
        path.unlink()
    if not any(lost.values()):
        shutil.rmtree(folder, ignore_errors=True)
    return lost


class TrialRunCallback(tune.Callback):
    """Give every finished or crashed trial's MLflow run its final status and reason.

    A trial stopped by ASHA may be killed before its own ``finally`` runs; this closes its run
    and records why it ended in the ``stop_reason`` tag: ``completed``,
    ``early stopped by asha at epoch N`` or ``error: <last line of the error>``.

    Holds only strings, so it pickles into Tune's experiment state and survives ``Tuner.restore``.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        max_epochs: int,
        scheduler: str,
        spool_dir: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = int(max_epochs)
        self.scheduler = scheduler
        self.spool_dir = spool_dir

    def _close(self, trial: Any, status: str, reason: str) -> None:
        # Quick requests: Tune's loop runs this callback, and MLflow's minutes of retries against a
        # dead server would stall every trial. A close the server misses is kept in
        # ``<spool_dir>/closes/`` and made by :func:`replay_outage` when the search ends.
        try:
            with quick_requests(self.tracking_uri):
                close_trial_run(
                    MlflowClient(self.tracking_uri),
                    self.experiment_id,
                    self.parent_run_id,
                    trial.trial_id,
                    status,
                    reason,
                )
        except Exception as exc:  # bookkeeping must never end the search
            if server_reachable(self.tracking_uri):
                logger.exception("could not close the MLflow run of trial %s: %s", trial.trial_id, exc)
            elif getattr(self, "spool_dir", None) is None:  # a callback pickled before spools existed
                logger.error("MLflow is unreachable: trial %s's run was not closed (%s)", trial.trial_id, reason)
            else:
                entry = {"trial_id": trial.trial_id, "status": status, "reason": reason}
                write_json_atomic(Path(self.spool_dir) / CLOSES / f"{trial.trial_id}.json", entry)
                logger.warning("MLflow is unreachable: trial %s's run will be closed when it returns", trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("training_iteration", 0))
        reason = "completed" if epochs >= self.max_epochs else f"early stopped by {self.scheduler} at epoch {epochs}"
        self._close(trial, "FINISHED", reason)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = None
        try:
            error = trial.get_pickled_error() or trial.get_error()
        except Exception:  # an unreadable error file must not hide the failure itself
            pass
        cause = getattr(error, "cause", None) or error
        message = f"{type(cause).__name__}: {cause}" if cause is not None else "the trial raised"
        lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
        self._close(trial, "FAILED", f"error: {lines[0] if lines else message}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        logger.warning("trial %s failed and will be retried from its last checkpoint", trial.trial_id)
