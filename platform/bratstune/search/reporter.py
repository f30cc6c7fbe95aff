"""The MLflow side of ``fit``'s reporter callback: per-epoch metrics and the best model.

``bratstune.training`` knows nothing of MLflow: :func:`bratstune.training.fit.fit` hands an
:class:`~bratstune.training.fit.EpochReport` to whatever reporter it is given. This one logs it to
an MLflow run; search trials (:func:`bratstune.search.trial.run_trial`), cross-validation folds and
``bratstune train`` use it::

    with tracking.start_run(run_name="r", config=config):
        reporter = MlflowReporter()
        fit(config, data, reporter=reporter, out_dir=out)
        reporter.close()

Everything goes through a :class:`bratstune.tracking.outage.RunBuffer`: when the tracking server
dies, training goes on, the epochs are buffered and sent when it returns; :meth:`MlflowReporter.close`
waits a bounded time for it and reports what could not be sent.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric

from bratstune.tracking.outage import RunBuffer
from bratstune.training.report import EpochReport

__all__ = ["MlflowReporter"]


class MlflowReporter:
    """``fit`` reporter: per-epoch metrics (step = epoch) and the best model as artifacts.

    Args:
        run_id: the run to log to (default: the active run when the reporter is created).
        log_best: upload the best-model folder under ``artifact_path`` whenever it improves.
        artifact_path: artifact folder for the best model.
        spool: file that keeps what a dead tracking server could not take yet (see
            :class:`~bratstune.tracking.outage.RunBuffer`).

    Validation metrics are logged only for epochs that validated (``report.validated``), and
    non-finite values are skipped. :attr:`buffer` holds what a dead server could not take yet.
    """

    def __init__(
        self,
        *,
        run_id: str | None = None,
        log_best: bool = True,
        artifact_path: str = "best_model",
        spool: str | Path | None = None,
    ) -> None:
        active = mlflow.active_run()
        if run_id is None and active is None:
            raise RuntimeError("MlflowReporter needs a run: pass run_id or create it inside start_run()")
        self.run_id = run_id or active.info.run_id  # type: ignore[union-attr]
        self.buffer = RunBuffer(self.run_id, mlflow.get_tracking_uri(), spool=spool)
        self.log_best = log_best
        self.artifact_path = artifact_path

    def __call__(self, report: EpochReport) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, report.epoch)
            for key, value in report.metrics.items()
            if (report.validated or not key.startswith("val/")) and math.isfinite(float(value))
        ]
        self.buffer.log_metrics(metrics)
        if self.log_best and report.is_best and report.best_dir is not None:
            self.buffer.log_artifacts(report.best_dir, self.artifact_path)

    def close(self, status: str | None = None, *, timeout: float | None = None) -> dict[str, int]:
        """Send what is buffered (and the run's final ``status``, if given); see :meth:`RunBuffer.close`.

        Returns:
            What could not be sent, by kind (all zero when everything reached the server).
        """
        if status is not None:
            self.buffer.set_terminated(status)
        return self.buffer.close(timeout)
