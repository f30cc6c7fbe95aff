"""Driver-side Ray Tune callback that closes each trial's MLflow child run with its stop reason.

Kept apart from :mod:`bratstune.search.tune` and :mod:`bratstune.search.trial` because it
subclasses ``ray.tune.Callback`` at import time (Tune pickles callbacks into the experiment state,
so the class must live at module level).
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from bratstune.tracking.filters import tag_equals

logger = logging.getLogger(__name__)

__all__ = ["STOP_TAG", "TRIAL_TAG", "TrialRunCallback", "find_trial_run"]

TRIAL_TAG = "ray_trial_id"
STOP_TAG = "stop_reason"


def find_trial_run(client: Any, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow child run of ``trial_id`` under ``parent_run_id`` (by its ``ray_trial_id`` tag)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"{tag_equals(TRIAL_TAG, trial_id)} and {tag_equals('mlflow.parentRunId', parent_run_id)}",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class TrialRunCallback(tune.Callback):
    """Give every finished or crashed trial's MLflow run its final status and reason.

    A trial stopped by ASHA may be killed before its own ``finally`` runs; this closes its run
    and records why it ended in the ``stop_reason`` tag: ``completed``,
    ``early stopped by asha at epoch N`` or ``error: <last line of the error>``.

    Holds only strings, so it pickles into Tune's experiment state and survives ``Tuner.restore``.
    """

    def __init__(
        self, tracking_uri: str, experiment_id: str, parent_run_id: str, max_epochs: int, scheduler: str
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.max_epochs = int(max_epochs)
        self.scheduler = scheduler

    def _close(self, trial: Any, status: str, reason: str) -> None:
        try:
            client = MlflowClient(self.tracking_uri)
            run_id = find_trial_run(client, self.experiment_id, self.parent_run_id, trial.trial_id)
            if run_id is None:
                logger.warning("trial %s has no MLflow run to close", trial.trial_id)
                return
            client.set_tag(run_id, STOP_TAG, reason[:5000])
            client.set_tag(run_id, "ray_trial_status", "ERROR" if status == "FAILED" else "TERMINATED")
            if status == "FAILED" or client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status=status)
        except Exception:  # bookkeeping must never end the search
            logger.exception("could not close the MLflow run of trial %s", trial.trial_id)

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
