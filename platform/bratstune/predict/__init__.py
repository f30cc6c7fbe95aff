"""Batch prediction with a packaged ensemble: ledger, workers, QC report, drift flags.

* :mod:`~bratstune.predict.batch`: :func:`predict_cohort`, :func:`watch`, :class:`BatchSummary`;
* :mod:`~bratstune.predict.worker`: :class:`CasePredictor` (one case end to end; Ray actors);
* :mod:`~bratstune.predict.ledger`: :class:`Ledger` (what was predicted from which input and model);
* :mod:`~bratstune.predict.report`: QC thumbnails, cohort plot, ``report.html``;
* :mod:`~bratstune.predict.drift`: :func:`check_drift` against the training fingerprint;
* :mod:`~bratstune.predict.plausibility`: per-case and cohort-level plausibility flags
  (:class:`PlausibilityRules`) and :func:`oof_statistics`, recorded in a package at registration.

Prediction never imports the training loop (an import-linter contract and a test hold this).
"""

from __future__ import annotations

from bratstune.predict.batch import BatchSummary, predict_cohort, watch
from bratstune.predict.drift import DriftTolerance, check_drift
from bratstune.predict.ledger import Ledger
from bratstune.predict.plausibility import PlausibilityRules, case_flags, cohort_flags, oof_statistics
from bratstune.predict.worker import CasePredictor

__all__ = [
    "BatchSummary",
    "CasePredictor",
    "DriftTolerance",
    "Ledger",
    "PlausibilityRules",
    "case_flags",
    "check_drift",
    "cohort_flags",
    "oof_statistics",
    "predict_cohort",
    "watch",
]
