"""One prediction worker: load the ensemble once, then predict case after case (in-process or as Ray actors).

:class:`CasePredictor` runs one case end to end: load the NIfTI files, ``Ensemble.segment``
(reorient + resample to the model grid, preprocess, sliding window + TTA + mean, probabilities
back to the input grid, decode, post-process), write ``<out>/<case-id>-seg.nii.gz`` with the
input's affine, header and shape (temp file + rename), drift flags against the training
fingerprint, plausibility flags (:mod:`bratstune.predict.plausibility`), region volumes and
lesion counts, the QC thumbnail ``<out>/qc/<case-id>.png``, and the worker's process id and peak
resident memory so far (``worker_pid``, ``peak_rss_mb``: a leak shows as a peak that keeps growing
along a batch). A case that cannot be predicted
returns ``{"case_id", "error"}`` instead of raising, so a bad case never stops the batch. A case
that failed because the disk is full (or a file-size or quota limit was hit) also gets
``"retry": True``: that is no fault of the case, so the ledger does not keep it as failed and the
next run predicts it again.

:func:`run_local` drives one predictor in this process; :func:`run_ray` one Ray actor per worker
(1 CPU each), replacing an actor that dies (e.g. out of memory) and recording its case as failed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bratstune import paths
from bratstune.data.case import load_case
from bratstune.data.nifti import write_nifti_atomic
from bratstune.ensemble.package import Ensemble
from bratstune.errors import DataError
from bratstune.metrics.volumes import region_stats
from bratstune.predict.drift import check_drift
from bratstune.predict.plausibility import PlausibilityRules, case_flags
from bratstune.predict.report import save_thumbnail

logger = logging.getLogger(__name__)

__all__ = ["QC_DIR", "CasePredictor", "one_line", "output_name", "run_local", "run_ray"]

QC_DIR = "qc"

Row = dict[str, Any]

#: ``OSError`` numbers that say the output storage is full, not that the case is bad.
STORAGE_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def output_name(case_id: str) -> str:
    return f"{case_id}-seg.nii.gz"


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (``VmHWM``; Linux reports ``ru_maxrss`` in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return reason if isinstance(exc, DataError) else f"{type(exc).__name__}: {reason}"


class CasePredictor:
    """Loads the ensemble once; :meth:`__call__` predicts one case and writes its outputs.

    Args:
        model_folder: the ensemble folder (verified on load); ignored when ``ensemble`` is given.
        out: output folder.
        model_label: ``NAME/VERSION`` (or the URI) written into the table.
        device: torch device.
        threads: ``torch.set_num_threads`` (``None``: leave torch's setting).
        thumbnails: write ``qc/<case>.png``.
        ensemble: an already loaded ensemble (in-process use).
        plausibility: thresholds of the plausibility flags (default :class:`PlausibilityRules`).
    """

    def __init__(
        self,
        model_folder: str | Path | None,
        out: str | Path,
        *,
        model_label: str,
        device: str = "cpu",
        threads: int | None = None,
        thumbnails: bool = True,
        ensemble: Ensemble | None = None,
        plausibility: PlausibilityRules | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.ensemble = (ensemble if ensemble is not None else Ensemble.load(model_folder)).to(device)
        self.out = Path(out)
        self.model_label = model_label
        self.device = device
        self.thumbnails = thumbnails
        self.plausibility = plausibility or PlausibilityRules()

    def __call__(self, case: Any) -> Row:
        """Row for ``predictions.csv``, or ``{"case_id", "error"}`` when the case cannot be predicted."""
        try:
            return self._predict(case)
        except Exception as exc:  # a bad case must not stop the batch
            logger.warning("%s failed: %s", case.case_id, one_line(exc))
            if isinstance(exc, OSError) and exc.errno in STORAGE_FULL:
                return {"case_id": case.case_id, "error": one_line(exc), "retry": True}
            return {"case_id": case.case_id, "error": one_line(exc)}

    def predict(self, case: Any) -> Row:
        """Same as calling the predictor (the Ray actor method)."""
        return self(case)

    def _thumbnail(self, case: Any, data: Any, labels: Any, stats: Mapping[str, Any], flagged: bool) -> str:
        ens = self.ensemble
        title = f"{case.case_id}  " + "  ".join(f"{r} {stats[f'volume_{r}_ml']:.1f} mL" for r in ens.scheme.regions)
        path = save_thumbnail(
            self.out / QC_DIR / f"{case.case_id}.png", data.image, labels, ens.scheme, title=title, flagged=flagged
        )
        return f"{QC_DIR}/{path.name}"

    def _predict(self, case: Any) -> Row:
        ens = self.ensemble
        t0 = time.perf_counter()
        data = load_case(dataclasses.replace(case, label=None))  # prediction never reads a label
        t1 = time.perf_counter()
        seg = ens.segment(data, device=self.device)
        t2 = time.perf_counter()
        name = output_name(case.case_id)
        write_nifti_atomic(self.out / name, seg.labels, data.affine, data.header)
        t3 = time.perf_counter()
        flags = check_drift(seg.fingerprint, ens.training_fingerprint)
        stats = region_stats(seg.labels, ens.scheme, data.spacing)
        implausible = case_flags(
            seg.labels,
            np.any(np.asarray(data.image) != 0, axis=0),
            ens.scheme,
            stats=stats,
            hierarchy=seg.hierarchy,
            oof=ens.oof_statistics,
            rules=self.plausibility,
        )
        flagged = bool(flags or implausible)
        thumb = self._thumbnail(case, data, seg.labels, stats, flagged) if self.thumbnails else None
        return {
            "case_id": case.case_id,
            "output": name,
            "model": self.model_label,
            **stats,
            "seconds": round(time.perf_counter() - t0, 3),
            "load_s": round(t1 - t0, 3),
            **{f"{k}_s": round(v, 3) for k, v in seg.timings.items()},
            "write_s": round(t3 - t2, 3),
            "qc_s": round(time.perf_counter() - t3, 3),
            "shape": "x".join(str(s) for s in seg.labels.shape),
            "drift": "; ".join(flags),
            "plausibility": "; ".join(implausible),
            "thumbnail": thumb,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "worker_pid": os.getpid(),
            "peak_rss_mb": peak_rss_mb(),
        }


def run_local(cases: Sequence[Any], make: Callable[[], CasePredictor], on_result: Callable[[Row], None]) -> None:
    """Predict ``cases`` one after the other with one predictor in this process."""
    predictor = make()
    for case in cases:
        on_result(predictor(case))


def run_ray(cases: Sequence[Any], workers: int, kwargs: Mapping[str, Any], on_result: Callable[[Row], None]) -> None:
    """Predict ``cases`` with ``workers`` Ray actors (``CasePredictor(**kwargs)`` each), results as they come."""
    paths.keep_ray_on_loopback()  # before Ray is imported
    # Deferred: Ray takes seconds to import and only multi-worker runs use it.
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        logger.info("starting a local Ray with %d CPUs", workers)
        ray.init(num_cpus=workers, include_dashboard=False)
    actor_cls = ray.remote(num_cpus=1)(CasePredictor)
    actors = [actor_cls.remote(**kwargs) for _ in range(min(workers, len(cases)))]
    queue = list(cases)
    pending: dict[Any, tuple[Any, Any]] = {}
    try:
        for actor in actors:
            if queue:
                case = queue.pop(0)
                pending[actor.predict.remote(case)] = (actor, case)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, case = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as exc:  # the actor died (e.g. out of memory): record and replace it
                result = {"case_id": case.case_id, "error": f"worker failed: {one_line(exc)}"}
                actors.remove(actor)
                actor = actor_cls.remote(**kwargs)
                actors.append(actor)
            on_result(result)
            if queue:
                nxt = queue.pop(0)
                pending[actor.predict.remote(nxt)] = (actor, nxt)
    finally:
        for actor in actors:
            ray.kill(actor)
