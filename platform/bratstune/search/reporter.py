"""The MLflow side of ``fit``'s reporter callback: per-epoch metrics and the best model.

``bratstune.training`` knows nothing of MLflow: :func:`bratstune.training.fit.fit` hands an
:class:`~bratstune.training.fit.EpochReport` to whatever reporter it is given. This one logs it to
an MLflow run; search trials (:func:`bratstune.search.trial.run_trial`), cross-validation folds and
``bratstune train`` use it::

    with tracking.start_run(run_name="r", config=config):
        fit(config, data, reporter=MlflowReporter(), out_dir=out)
"""

from __future__ import annotations

import math
import time

import mlflow
from mlflow.entities import Metric

from bratstune.training.report import EpochReport

__all__ = ["MlflowReporter"]


class MlflowReporter:
    """``fit`` reporter: per-epoch metrics (step = epoch) and the best model as artifacts.

    Args:
        run_id: the run to log to (default: the active run when the reporter is created).
        log_best: upload the best-model folder under ``artifact_path`` whenever it improves.
        artifact_path: artifact folder for the best model.

    Validation metrics are logged only for epochs that validated (``report.validated``), and
    non-finite values are skipped.
    """

    def __init__(self, *, run_id: str | None = None, log_best: bool = True, artifact_path: str = "best_model") -> None:
        active = mlflow.active_run()
        if run_id is None and active is None:
            raise RuntimeError("MlflowReporter needs a run: pass run_id or create it inside start_run()")
        self.run_id = run_id or active.info.run_id  # type: ignore[union-attr]
        self.client = mlflow.tracking.MlflowClient()
        self.log_best = log_best
        self.artifact_path = artifact_path

    def __call__(self, report: EpochReport) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, report.epoch)
            for key, value in report.metrics.items()
            if (report.validated or not key.startswith("val/")) and math.isfinite(float(value))
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        if self.log_best and report.is_best and report.best_dir is not None:
            self.client.log_artifacts(self.run_id, str(report.best_dir), self.artifact_path)
