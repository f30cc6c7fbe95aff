"""Stage 3, out-of-fold probabilities: written by each fold trial, pooled by the driver.

Every case is held out by exactly one fold; that fold's best model predicts it once (sliding
window, :func:`bratstune.search.threshold_job.cache_probabilities`) and the trial writes the
per-region probabilities to ``<out>/oof/<case_id>.npy`` (float16 ``(R, x, y, z)`` on the
preprocessed crop) before it ends. The driver reads them back as
:class:`~bratstune.search.thresholds.CachedCase` objects for decode tuning: no re-inference.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bratstune.errors import DataError
from bratstune.search.threshold_job import cache_probabilities
from bratstune.search.thresholds import CachedCase
from bratstune.training.fit import inference_settings
from bratstune.training.report import FitResult

logger = logging.getLogger(__name__)

__all__ = ["OOF_DIR", "load_oof", "write_oof"]

OOF_DIR = "oof"


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def write_oof(result: FitResult, held_out: Sequence[Any], cv_dir: str | Path, fold_dir: Path) -> int:
    """Write the OOF probabilities of ``held_out`` by the fold's best model (in the trial).

    Also records the case ids in ``<fold_dir>/oof_cases.json``. Returns the number of cases.
    """
    oof = Path(cv_dir) / OOF_DIR
    oof.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cached = cache_probabilities(result.model, held_out, inference_settings(result.config))
    for case in cached:
        _save_npy(oof / f"{case.case_id}.npy", case.probs.astype(np.float16))
    (fold_dir / "oof_cases.json").write_text(json.dumps([c.case_id for c in cached]))
    logger.info("OOF probabilities of %d case(s) in %.1f s", len(cached), time.perf_counter() - start)
    return len(cached)


def load_oof(out_dir: Path, cases: Sequence[Any]) -> list[CachedCase]:
    """``CachedCase`` objects (OOF probabilities + reference) of ``cases`` from ``<out>/oof``.

    Raises:
        DataError: a case has no OOF file (its fold did not finish).
    """
    out = []
    for case in cases:
        path = Path(out_dir) / OOF_DIR / f"{case.case_id}.npy"
        if not path.is_file():
            raise DataError(path, "missing out-of-fold probabilities (the case's fold did not finish)")
        label = np.asarray(case.label, dtype=np.uint8)
        out.append(CachedCase(case.case_id, np.load(path), label, tuple(float(s) for s in case.spacing)))
    return out
