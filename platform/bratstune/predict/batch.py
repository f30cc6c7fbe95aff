"""Batch prediction over cohorts: idempotent, resumable, parallel (Ray), with QC and drift flags.

::

    summary = predict_cohort("inbox/", "models:/bratstune-gli@champion", "predictions/", workers=2)
    summary.ok        # False if any case failed (bad input); the exit code of the job

For every case :func:`bratstune.data.layout.discover` finds (any supported naming, any depth):

1. skip it when the **ledger** (``<out>/ledger.json``, :mod:`bratstune.predict.ledger`) says it was
   done with the same input (SHA-256 of its files) and the same model (the ensemble's manifest
   digest) and its output exists (``force=True`` re-does everything); a case that failed with the
   same input is skipped too and stays in ``failures.csv``;
2. load, preprocess, ensemble inference, threshold, post-process (``Ensemble.segment``), and write
   ``<out>/<case-id>-seg.nii.gz`` with the input's affine and header through a temporary file and
   a rename (an interrupted run never leaves a partial NIfTI) (:mod:`bratstune.predict.worker`);
3. compare its fingerprint with the training data's (:mod:`bratstune.predict.drift`) and check the
   prediction's plausibility (:mod:`bratstune.predict.plausibility`: empty, whole tumour too large
   for the brain, labels outside the brain, ET without TC, unusual component counts): flags,
   never refusal;
4. QC thumbnail ``<out>/qc/<case-id>.png``; region volumes (mL) and lesion counts.

Then the cohort-level plausibility flags (this cohort's volumes and lesion counts against the
model's out-of-fold statistics), ``predictions.csv`` (every finished case of the cohort, with its
``drift`` and ``plausibility`` flags), ``failures.csv`` (case, one-line reason), ``report.html`` +
``qc/summary.png``, and an MLflow run with the model version, counts, flags and failures. The
ledger is rewritten after each case, so a killed run resumes where it stopped.

Parallelism: ``workers=1`` runs in this process without Ray; ``workers>1`` starts one Ray actor
per worker (1 CPU each, ``threads`` torch threads), each loading the model once.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from tqdm.auto import tqdm

from bratstune import paths
from bratstune.data.layout import discover
from bratstune.ensemble.package import Ensemble
from bratstune.ensemble.registry import LoadedEnsemble, load_ensemble
from bratstune.errors import ConfigError, DataError
from bratstune.predict.ledger import Ledger
from bratstune.predict.plausibility import PlausibilityRules, cohort_flags
from bratstune.predict.report import save_summary_plot, write_report
from bratstune.predict.worker import QC_DIR, CasePredictor, one_line, run_local, run_ray
from bratstune.tracking.runs import check_reachable, setup_mlflow, start_run, tracking_uri

logger = logging.getLogger(__name__)

__all__ = ["BatchSummary", "predict_cohort", "watch"]

WORK_PREFIX = ".bratstune-work-"  # a run's scratch folder inside the output folder

PREDICTIONS_FILE = "predictions.csv"
FAILURES_FILE = "failures.csv"
REPORT_FILE = "report.html"


@dataclass
class BatchSummary:
    """Outcome of :func:`predict_cohort`."""

    cohort: Path
    out: Path
    model: str
    cases: int = 0
    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    implausible: list[str] = field(default_factory=list)
    cohort_flags: list[str] = field(default_factory=list)
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        return (
            f"{self.cases} case(s): {len(self.predicted)} predicted, {len(self.skipped)} already done, "
            f"{len(self.failures)} failed, {len(self.flagged)} drift-flagged, "
            f"{len(self.implausible)} implausible, {len(self.cohort_flags)} cohort flag(s) ({self.seconds:.1f} s)"
        )


def _problem_case(problem: DataError) -> str:
    match = re.search(r"case '([^']+)'", problem.problem)
    if match:
        return match.group(1)
    return problem.path.name if problem.path is not None else "?"


def _settled(case: Any, settle_s: float) -> bool:
    if settle_s <= 0:
        return True
    newest = max(Path(p).stat().st_mtime for p in case.images.values())
    return time.time() - newest >= settle_s


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    os.replace(tmp, path)


@dataclass
class _Batch:
    """One :func:`predict_cohort` call's bookkeeping: what to do, what happened (ledger, failures)."""

    summary: BatchSummary
    loaded: LoadedEnsemble
    ledger: Ledger
    failures: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    bar: Any = None

    @property
    def digest(self) -> str:
        return self.loaded.ensemble.digest or ""

    def plan(self, found: Any, *, force: bool, settle_s: float) -> list[Any]:
        """The cases to predict now; records discovery problems, skips and earlier failures."""
        for problem in found.problems:
            self.failures[_problem_case(problem)] = str(problem)
        todo = []
        for case in found.cases:
            try:
                digest = self.ledger.input_hash(case)
            except OSError as exc:
                self.failures[case.case_id] = one_line(exc)
                continue
            if not _settled(case, settle_s):
                logger.info("%s: files are still changing; left for the next run", case.case_id)
                continue
            if not force and self.ledger.is_current(case.case_id, digest, self.digest, self.summary.out):
                self.summary.skipped.append(case.case_id)
                entry = self.ledger.cases[case.case_id]
                if entry.get("status") == "failed":
                    self.failures[case.case_id] = entry.get("reason", "failed earlier")
                continue
            self.hashes[case.case_id] = digest
            todo.append(case)
        found_ids = {c.case_id for c in found.cases}
        self.summary.cases = len(found_ids) + len([c for c in self.failures if c not in found_ids])
        return todo

    def on_result(self, result: dict[str, Any]) -> None:
        """Record one worker result in the ledger (rewritten at once) and the progress bar."""
        case_id = result["case_id"]
        entry = {
            "input": self.hashes[case_id],
            "model": self.digest,
            "model_label": self.loaded.label,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if "error" in result and result.get("retry"):  # e.g. disk full: not the case's fault, re-done next run
            self.failures[case_id] = result["error"]
            self.ledger.cases.pop(case_id, None)
            self.ledger.save()
        elif "error" in result:
            self.failures[case_id] = result["error"]
            self.ledger.record(case_id, {**entry, "status": "failed", "reason": result["error"]})
        else:
            self.summary.predicted.append(case_id)
            self.ledger.record(case_id, {**entry, "status": "done", "output": result["output"], "row": result})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{case_id} {'FAILED' if 'error' in result else 'ok'}")

    def finish(self, found_ids: set[str]) -> BatchSummary:
        """Rows of every finished case of the cohort, failures and drift flags."""
        cases, summary = self.ledger.cases, self.summary
        summary.rows = [
            dict(cases[c]["row"])
            for c in sorted(found_ids)
            if c in cases and cases[c].get("status") == "done" and c not in self.failures
        ]
        summary.failures = [{"case_id": c, "reason": r} for c, r in sorted(self.failures.items())]
        summary.flagged = [r["case_id"] for r in summary.rows if r.get("drift")]
        summary.implausible = [r["case_id"] for r in summary.rows if r.get("plausibility")]
        return summary


def _work_dir(out: Path, stack: contextlib.ExitStack) -> Path:
    """This run's hidden scratch folder inside ``out`` (model download, actors' copy); removed at the end.

    Never the system temp folder: a run killed before its clean-up leaves it in ``out``, and the
    next run there removes it (folders of runs that are still going are left alone).
    """
    for stale in out.glob(f"{WORK_PREFIX}*"):
        pid = stale.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=out))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _actor_folder(loaded: LoadedEnsemble, work: Path) -> Path:
    """An ensemble folder Ray actors can load (the download, else a copy saved into ``work``)."""
    if loaded.folder is not None:
        return loaded.folder
    return loaded.ensemble.save(work / "actor-model")


def predict_cohort(
    cohort: str | Path,
    model: str | Path | Any,
    out: str | Path,
    *,
    workers: int = 1,
    force: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    thumbnails: bool = True,
    progress: bool = True,
    settle_s: float = 0.0,
    experiment: str | None = "bratstune-predict",
    use_ray: bool | None = None,
    plausibility: PlausibilityRules | Mapping[str, Any] | None = None,
) -> BatchSummary:
    """Predict every new or changed case of ``cohort`` into ``out`` (see the module docstring).

    Args:
        cohort: folder of cases (any supported layout, searched recursively).
        model: ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` / ``runs:/`` URI, a model or
            ensemble folder, or a :class:`bratstune.ensemble.registry.LoadedEnsemble`.
        out: output folder (segmentations, ledger, tables, report).
        workers: 1 = in this process, no Ray; N > 1 = N Ray actors.
        force: re-predict every case.
        device: torch device of the networks.
        threads: torch threads per worker (default: torch's setting in-process, ``cpu_count // N`` in actors).
        thumbnails: write QC thumbnails and the report's images.
        progress: tqdm progress bar on stderr.
        settle_s: leave cases whose newest file is younger than this for a later run (still copying).
        experiment: MLflow experiment of the batch run; ``None`` = no MLflow run.
        use_ray: run through Ray actors; default ``workers > 1`` (``True`` with ``workers=1``:
            one actor, e.g. on a cluster).
        plausibility: thresholds of the plausibility flags (:class:`PlausibilityRules` or a
            mapping of its fields, e.g. ``{"max_brain_share": 0.2}``); default the class defaults.

    Returns:
        :class:`BatchSummary` (``ok`` is False when a case failed).
    """
    if workers < 1:
        raise ConfigError(f"workers: expected >= 1, got {workers}")
    rules = PlausibilityRules.from_mapping(plausibility)
    if experiment:  # an unreachable MLflow server: one line now, not after the whole batch
        check_reachable(tracking_uri())
    start = time.perf_counter()
    out = paths.output_folder(Path(out).absolute())
    with contextlib.ExitStack() as stack:
        work = _work_dir(out, stack)  # a models:/ download is kept there for the Ray actors until the batch ends
        loaded = model if isinstance(model, LoadedEnsemble) else load_ensemble(model, dst=work / "model")
        ens = loaded.ensemble
        batch = _Batch(BatchSummary(Path(cohort), out, loaded.label), loaded, Ledger(out))
        found = discover(cohort, strict=False, modalities=ens.modalities)
        unusable = [p for p in found.problems if p.path == Path(cohort)]
        if unusable and not found.cases:  # empty folder, nothing recognisable: bad input, not a failed case
            raise unusable[0]
        todo = batch.plan(found, force=force, settle_s=settle_s)
        logger.info(
            "%s: %d case(s), %d to predict with %s (%s)",
            cohort,
            len(found.cases),
            len(todo),
            loaded.label,
            ens.describe(),
        )
        if progress and todo:
            batch.bar = tqdm(total=len(todo), desc="predicting", unit="case")
        kwargs = {
            "out": str(out),
            "model_label": loaded.label,
            "device": device,
            "thumbnails": thumbnails,
            "plausibility": rules,
        }
        try:
            if todo and not (workers > 1 if use_ray is None else use_ray):
                run_local(todo, lambda: CasePredictor(None, threads=threads, ensemble=ens, **kwargs), batch.on_result)
            elif todo:
                per = threads or max(1, (os.cpu_count() or 1) // workers)
                folder = str(_actor_folder(loaded, work))
                run_ray(todo, workers, {**kwargs, "model_folder": folder, "threads": per}, batch.on_result)
        finally:
            if batch.bar is not None:
                batch.bar.close()
            batch.ledger.save()
        summary = batch.finish({c.case_id for c in found.cases})
        summary.cohort_flags = cohort_flags(summary.rows, ens.scheme, ens.oof_statistics, rules)
        for flag in summary.cohort_flags:
            logger.warning("cohort: %s", flag)
        _write_outputs(summary, ens)
        summary.seconds = time.perf_counter() - start
        if experiment:
            summary.mlflow_run_id = _log_batch(summary, loaded, experiment)
    logger.info("%s", summary.line())
    return summary


def _write_outputs(summary: BatchSummary, ens: Ensemble) -> None:
    out = summary.out
    regions = list(ens.scheme.regions)
    columns = [
        "case_id",
        "output",
        "model",
        *(f"volume_{r}_ml" for r in regions),
        *(f"lesions_{r}" for r in regions),
        *("seconds", "load_s", "preprocess_s", "network_s", "postprocess_s", "write_s", "qc_s", "shape"),
        *("drift", "plausibility", "finished", "worker_pid", "peak_rss_mb"),
    ]
    _write_csv(out / PREDICTIONS_FILE, summary.rows, columns)
    _write_csv(out / FAILURES_FILE, summary.failures, ["case_id", "reason"])
    png = save_summary_plot(out / QC_DIR / "summary.png", summary.rows, ens.scheme)
    counts = {
        "cases": summary.cases,
        "predicted now": len(summary.predicted),
        "already done": len(summary.skipped),
        "failed": len(summary.failures),
        "drift-flagged": len(summary.flagged),
        "implausible": len(summary.implausible),
    }
    write_report(
        out / REPORT_FILE,
        rows=summary.rows,
        failures=summary.failures,
        scheme=ens.scheme,
        model=summary.model,
        summary_png=png,
        counts=counts,
        cohort_flags=summary.cohort_flags,
    )


def _log_batch(summary: BatchSummary, loaded: LoadedEnsemble, experiment: str) -> str | None:
    experiment_id = setup_mlflow(experiment)
    tags = {
        "bratstune.kind": "batch_predict",
        "model.uri": loaded.uri,
        "model.name": loaded.name or "",
        "model.version": loaded.version or "",
        "model.digest": loaded.ensemble.digest or "",
        "cohort": str(Path(summary.cohort).absolute()),
        "output": str(summary.out),
    }
    with start_run(
        run_name=f"predict-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment_id=experiment_id,
        tags=tags,
        data_fingerprint=loaded.ensemble.lineage.get("data_fingerprint"),
    ) as run:
        mlflow.log_metrics(
            {
                "cases": summary.cases,
                "predicted": len(summary.predicted),
                "skipped": len(summary.skipped),
                "failed": len(summary.failures),
                "drift_flagged": len(summary.flagged),
                "implausible": len(summary.implausible),
                "cohort_flags": len(summary.cohort_flags),
                "seconds": summary.seconds,
            }
        )
        done = [r for r in summary.rows if r["case_id"] in set(summary.predicted)]
        if done:
            mlflow.log_metric("seconds_per_case", sum(float(r["seconds"]) for r in done) / len(done))
            mlflow.log_metric("worker_peak_rss_mb", max(float(r.get("peak_rss_mb") or 0) for r in done))
        for name in (PREDICTIONS_FILE, FAILURES_FILE, REPORT_FILE):
            mlflow.log_artifact(str(summary.out / name))
        mlflow.set_tag("failures", "; ".join(f"{f['case_id']}: {f['reason']}" for f in summary.failures)[:5000])
        mlflow.set_tag("cohort_flags", "; ".join(summary.cohort_flags)[:5000])
        return run.info.run_id


def watch(
    inbox: str | Path,
    model: str | Path,
    out: str | Path,
    *,
    interval: float = 60.0,
    max_polls: int | None = None,
    on_batch: Callable[[BatchSummary], None] | None = None,
    **options: Any,
) -> list[BatchSummary]:
    """Poll ``inbox`` every ``interval`` seconds and predict new or changed cases (any sub-folder).

    The model URI is resolved again at every poll, so a newly promoted ``champion`` is picked up
    (and, its digest being new, re-predicts the cohort). Stops after ``max_polls`` polls
    (``None``: until interrupted). ``options`` go to :func:`predict_cohort` (``settle_s``
    defaults to 10 s here, so half-copied cases wait for the next poll).
    """
    options.setdefault("settle_s", 10.0)
    results: list[BatchSummary] = []
    polls = 0
    while max_polls is None or polls < max_polls:
        polls += 1
        started = time.monotonic()
        try:
            if any(Path(inbox).iterdir()):
                summary = predict_cohort(inbox, model, out, **options)
                results.append(summary)
                if on_batch is not None:
                    on_batch(summary)
            else:
                logger.info("%s is empty; waiting", inbox)
        except DataError as exc:  # e.g. an inbox holding nothing recognisable yet
            logger.warning("poll %d: %s", polls, exc)
        if max_polls is not None and polls >= max_polls:
            break
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return results
