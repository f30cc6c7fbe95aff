"""Batch prediction over cohorts: idempotent, resumable, parallel (Ray), with QC and drift flags.

::

    summary = predict_cohort("inbox/", "models:/bratstune-gli@champion", "predictions/", workers=2)
    summary.ok        # False if any case failed (bad input); the exit code of the job

For every case :func:`bratstune.data.layout.discover` finds (any supported naming, any depth):

1. skip it when the **ledger** (``<out>/ledger.json``) says it was done with the same input
   (SHA-256 of its files) and the same model (the ensemble's manifest digest) and its output exists
   (``force=True`` re-does everything); a case that failed with the same input is skipped too and
   stays in ``failures.csv``;
2. load, preprocess, ensemble inference, threshold, post-process (``Ensemble.segment``), and write
   ``<out>/<case-id>-seg.nii.gz`` with the input's affine and header through a temporary file and
   a rename (an interrupted run never leaves a partial NIfTI);
3. compare its fingerprint with the training data's (:mod:`bratstune.predict.drift`): flags, never refusal;
4. QC thumbnail ``<out>/qc/<case-id>.png``; region volumes (mL) and lesion counts.

Then ``predictions.csv`` (every finished case of the cohort), ``failures.csv`` (case, one-line
reason), ``report.html`` + ``qc/summary.png``, and an MLflow run with the model version, counts
and failures. The ledger is rewritten after each case, so a killed run resumes where it stopped.

Parallelism: ``workers=1`` runs in this process without Ray; ``workers>1`` starts one Ray actor
per worker (1 CPU each, ``threads`` torch threads), each loading the model once.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bratstune.data.cache import file_digest
from bratstune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["BatchSummary", "CasePredictor", "Ledger", "predict_cohort", "watch"]

LEDGER_FILE = "ledger.json"
PREDICTIONS_FILE = "predictions.csv"
FAILURES_FILE = "failures.csv"
REPORT_FILE = "report.html"
QC_DIR = "qc"


def output_name(case_id: str) -> str:
    return f"{case_id}-seg.nii.gz"


# -- ledger ------------------------------------------------------------------------------------------




class Ledger:
    """``<out>/ledger.json``: per case, its input hash, the model digest, status and table row.

    File hashes are memoised by (path, size, mtime) so an unchanged cohort is not re-read.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LEDGER_FILE
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.cases: dict[str, dict[str, Any]] = dict(data.get("cases", {}))
        self.files: dict[str, dict[str, Any]] = dict(data.get("files", {}))

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = str(path.absolute())
        hit = self.files.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return str(hit["sha256"])
        digest = file_digest(path)
        self.files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest

    def input_hash(self, case: Any) -> str:
        h = hashlib.sha256()
        for modality, path in sorted(case.images.items()):
            h.update(f"{modality}={self.file_hash(Path(path))};".encode())
        if getattr(case, "channel", None):
            h.update(json.dumps(dict(case.channel), sort_keys=True).encode())
        return h.hexdigest()

    def is_current(self, case_id: str, input_hash: str, model: str, out: Path) -> bool:
        entry = self.cases.get(case_id)
        if not entry or entry.get("input") != input_hash or entry.get("model") != model:
            return False
        return entry.get("status") == "failed" or (out / str(entry.get("output", ""))).is_file()

    def record(self, case_id: str, entry: Mapping[str, Any]) -> None:
        self.cases[case_id] = dict(entry)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "cases": self.cases, "files": self.files}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# -- one case ------------------------------------------------------------------------------------------


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
    """

    def __init__(self, model_folder: str | Path | None, out: str | Path, *, model_label: str, device: str = "cpu",
                 threads: int | None = None, thumbnails: bool = True, ensemble: Any = None) -> None:
        import torch

        from bratstune.ensemble.package import Ensemble

        if threads:
            torch.set_num_threads(int(threads))
        self.ensemble = (ensemble if ensemble is not None else Ensemble.load(model_folder)).to(device)
        self.out = Path(out)
        self.model_label = model_label
        self.device = device
        self.thumbnails = thumbnails

    def __call__(self, case: Any) -> dict[str, Any]:
        """Row for ``predictions.csv``, or ``{"case_id", "error"}`` when the case cannot be predicted."""
        try:
            return self._predict(case)
        except Exception as exc:  # a bad case must not stop the batch
            logger.warning("%s failed: %s", case.case_id, one_line(exc))
            return {"case_id": case.case_id, "error": one_line(exc)}

    def predict(self, case: Any) -> dict[str, Any]:
        """Same as calling the predictor (the Ray actor method)."""
        return self(case)

    def _predict(self, case: Any) -> dict[str, Any]:
        from bratstune.data.layout import load_case, write_nifti_atomic
        from bratstune.predict.drift import check_drift
        from bratstune.predict.report import region_stats, save_thumbnail

        ens = self.ensemble
        t0 = time.perf_counter()
        data = load_case(case)
        t1 = time.perf_counter()
        seg = ens.segment(data, device=self.device)
        t2 = time.perf_counter()
        name = output_name(case.case_id)
        write_nifti_atomic(self.out / name, seg.labels, data.affine, data.header)
        t3 = time.perf_counter()
        flags = check_drift(seg.fingerprint, ens.training_fingerprint)
        stats = region_stats(seg.labels, ens.scheme, data.spacing)
        thumb = None
        if self.thumbnails:
            title = f"{case.case_id}  " + "  ".join(f"{r} {stats[f'volume_{r}_ml']:.1f} mL" for r in ens.scheme.regions)
            path = save_thumbnail(self.out / QC_DIR / f"{case.case_id}.png", data.image, seg.labels, ens.scheme,
                                  title=title, flagged=bool(flags))
            thumb = f"{QC_DIR}/{path.name}"
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
            "thumbnail": thumb,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


# -- the batch --------------------------------------------------------------------------------------------


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
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def line(self) -> str:
        return (f"{self.cases} case(s): {len(self.predicted)} predicted, {len(self.skipped)} already done, "
                f"{len(self.failures)} failed, {len(self.flagged)} drift-flagged ({self.seconds:.1f} s)")


def _problem_case(problem: DataError) -> str:
    import re

    match = re.search(r"case '([^']+)'", problem.problem)
    if match:
        return match.group(1)
    return problem.path.name if problem.path is not None else "?"


def _run_local(cases: Sequence[Any], make: Callable[[], CasePredictor], on_result: Callable[[dict], None]) -> None:
    predictor = make()
    for case in cases:
        on_result(predictor(case))


def _run_ray(cases: Sequence[Any], workers: int, kwargs: Mapping[str, Any], on_result: Callable[[dict], None]) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
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


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    os.replace(tmp, path)


def _settled(case: Any, settle_s: float) -> bool:
    if settle_s <= 0:
        return True
    newest = max(Path(p).stat().st_mtime for p in case.images.values())
    return time.time() - newest >= settle_s


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

    Returns:
        :class:`BatchSummary` (``ok`` is False when a case failed).
    """
    from bratstune.data.layout import discover
    from bratstune.ensemble.registry import LoadedEnsemble, load_ensemble

    if workers < 1:
        raise ConfigError(f"workers: expected >= 1, got {workers}")
    start = time.perf_counter()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    loaded = model if isinstance(model, LoadedEnsemble) else load_ensemble(model, dst=None)
    ens = loaded.ensemble
    summary = BatchSummary(Path(cohort), out, loaded.label)
    found = discover(cohort, strict=False, modalities=ens.modalities)
    ledger = Ledger(out)
    failures: dict[str, str] = {}
    for problem in found.problems:
        failures[_problem_case(problem)] = str(problem)
    todo = []
    for case in found.cases:
        try:
            digest = ledger.input_hash(case)
        except OSError as exc:
            failures[case.case_id] = one_line(exc)
            continue
        if not _settled(case, settle_s):
            logger.info("%s: files are still changing; left for the next run", case.case_id)
            continue
        if not force and ledger.is_current(case.case_id, digest, ens.digest or "", out):
            summary.skipped.append(case.case_id)
            entry = ledger.cases[case.case_id]
            if entry.get("status") == "failed":
                failures[case.case_id] = entry.get("reason", "failed earlier")
            continue
        todo.append((case, digest))
    found_ids = {c.case_id for c in found.cases}
    summary.cases = len(found_ids) + len([c for c in failures if c not in found_ids])
    logger.info("%s: %d case(s), %d to predict with %s (%s)", cohort, len(found.cases), len(todo), loaded.label,
                ens.describe())
    hashes = {case.case_id: digest for case, digest in todo}
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="predicting", unit="case")

    def on_result(result: dict[str, Any]) -> None:
        case_id = result["case_id"]
        entry = {"input": hashes[case_id], "model": ens.digest or "", "model_label": loaded.label,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if "error" in result:
            failures[case_id] = result["error"]
            ledger.record(case_id, {**entry, "status": "failed", "reason": result["error"]})
        else:
            summary.predicted.append(case_id)
            ledger.record(case_id, {**entry, "status": "done", "output": result["output"], "row": result})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{case_id} {'FAILED' if 'error' in result else 'ok'}")

    kwargs = {"model_folder": str(loaded.folder), "out": str(out), "model_label": loaded.label, "device": device,
              "thumbnails": thumbnails}
    try:
        if use_ray is None:
            use_ray = workers > 1
        if todo and not use_ray:
            _run_local([c for c, _ in todo], lambda: CasePredictor(threads=threads, ensemble=ens, **kwargs), on_result)
        elif todo:
            per = threads or max(1, (os.cpu_count() or 1) // workers)
            _run_ray([c for c, _ in todo], workers, {**kwargs, "threads": per}, on_result)
    finally:
        if bar is not None:
            bar.close()
        ledger.save()
    summary.rows = [dict(ledger.cases[c]["row"]) for c in sorted(found_ids)
                    if c in ledger.cases and ledger.cases[c].get("status") == "done" and c not in failures]
    summary.failures = [{"case_id": c, "reason": r} for c, r in sorted(failures.items())]
    summary.flagged = [r["case_id"] for r in summary.rows if r.get("drift")]
    _write_outputs(summary, ens)
    summary.seconds = time.perf_counter() - start
    if experiment:
        summary.mlflow_run_id = _log_batch(summary, loaded, experiment)
    logger.info("%s", summary.line())
    return summary


def _write_outputs(summary: BatchSummary, ens: Any) -> None:
    from bratstune.predict.report import save_summary_plot, write_report

    out = summary.out
    regions = list(ens.scheme.regions)
    columns = (["case_id", "output", "model"] + [f"volume_{r}_ml" for r in regions] + [f"lesions_{r}" for r in regions]
               + ["seconds", "load_s", "preprocess_s", "network_s", "postprocess_s", "write_s", "qc_s", "shape", "drift",
                  "finished"])
    _write_csv(out / PREDICTIONS_FILE, summary.rows, columns)
    _write_csv(out / FAILURES_FILE, summary.failures, ["case_id", "reason"])
    png = save_summary_plot(out / QC_DIR / "summary.png", summary.rows, ens.scheme)
    counts = {"cases": summary.cases, "predicted now": len(summary.predicted), "already done": len(summary.skipped),
              "failed": len(summary.failures), "drift-flagged": len(summary.flagged)}
    write_report(out / REPORT_FILE, rows=summary.rows, failures=summary.failures, scheme=ens.scheme,
                 model=summary.model, summary_png=png, counts=counts)


def _log_batch(summary: BatchSummary, loaded: Any, experiment: str) -> str | None:
    import mlflow

    from bratstune.tracking.runs import setup_mlflow, start_run

    experiment_id = setup_mlflow(experiment)
    tags = {"bratstune.kind": "batch_predict", "model.uri": loaded.uri, "model.name": loaded.name or "",
            "model.version": loaded.version or "", "model.digest": loaded.ensemble.digest or "",
            "cohort": str(Path(summary.cohort).absolute()), "output": str(summary.out)}
    with start_run(run_name=f"predict-{time.strftime('%Y%m%d-%H%M%S')}", experiment_id=experiment_id,
                   tags=tags, data_fingerprint=loaded.ensemble.lineage.get("data_fingerprint")) as run:
        mlflow.log_metrics({"cases": summary.cases, "predicted": len(summary.predicted),
                            "skipped": len(summary.skipped), "failed": len(summary.failures),
                            "drift_flagged": len(summary.flagged), "seconds": summary.seconds})
        if summary.predicted:
            done = [r for r in summary.rows if r["case_id"] in set(summary.predicted)]
            if done:
                mlflow.log_metric("seconds_per_case", sum(float(r["seconds"]) for r in done) / len(done))
        for name in (PREDICTIONS_FILE, FAILURES_FILE, REPORT_FILE):
            mlflow.log_artifact(str(summary.out / name))
        mlflow.set_tag("failures", "; ".join(f"{f['case_id']}: {f['reason']}" for f in summary.failures)[:5000])
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

