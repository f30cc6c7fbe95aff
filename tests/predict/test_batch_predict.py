"""Batch prediction: outputs, failures, idempotence, resume, drift flags, report, CLI exit codes."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bratstune.predict.batch import predict_cohort

from .conftest import make_cohort


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*-seg.nii.gz")}


@pytest.mark.mlflow
def test_mixed_cohort_then_idempotent_then_incremental(trained_ensemble, mixed_cohort, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    root, good, missing, corrupt = mixed_cohort
    out = tmp_path / "out"
    first = predict_cohort(root, trained_ensemble, out, progress=False)

    # good cases written, bad ones recorded with a one-line reason, batch not ok
    assert sorted(first.predicted) == sorted(good) and not first.ok
    assert sorted(p.name for p in out.glob("*-seg.nii.gz")) == sorted(f"{c}-seg.nii.gz" for c in good)
    failures = {row["case_id"]: row["reason"] for row in _csv(out / "failures.csv")}
    assert set(failures) == {missing, corrupt}
    assert "missing modality t2f" in failures[missing]
    assert f"{corrupt}-t1c.nii.gz" in failures[corrupt] and "\n" not in failures[corrupt]
    assert not list(out.rglob("*.tmp*")), "temporary files left behind"

    # geometry: every output has its input's affine, shape and header geometry
    for case_id in good:
        src = nib.load(root / case_id / f"{case_id}-t1n.nii.gz")
        seg = nib.load(out / f"{case_id}-seg.nii.gz")
        assert seg.shape == src.shape
        assert np.array_equal(seg.affine, src.affine)
        assert seg.header.get_zooms() == src.header.get_zooms()
        assert np.array_equal(seg.header.get_sform(), src.header.get_sform())
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}

    # table: model, volumes in mL, lesion counts, timings
    rows = {r["case_id"]: r for r in _csv(out / "predictions.csv")}
    assert set(rows) == set(good)
    row = rows[good[0]]
    for key in (
        "model",
        "volume_WT_ml",
        "volume_TC_ml",
        "volume_ET_ml",
        "lesions_WT",
        "seconds",
        "load_s",
        "preprocess_s",
        "network_s",
        "postprocess_s",
        "write_s",
        "drift",
    ):
        assert key in row
    assert float(row["volume_WT_ml"]) >= float(row["volume_TC_ml"]) >= float(row["volume_ET_ml"])

    # report with one thumbnail per case and a summary plot
    html = (out / "report.html").read_text()
    for case_id in good:
        assert (out / "qc" / f"{case_id}.png").is_file() and f"qc/{case_id}.png" in html
    assert (out / "qc" / "summary.png").is_file() and missing in html

    # MLflow run with counts and failures
    run = MlflowClient(mlflow_uri).get_run(first.mlflow_run_id)
    assert run.data.metrics["predicted"] == 3 and run.data.metrics["failed"] == 2
    assert corrupt in run.data.tags["failures"]

    # second run: nothing to do
    before = _mtimes(out)
    second = predict_cohort(root, trained_ensemble, out, progress=False, experiment=None)
    assert second.predicted == [] and sorted(second.skipped) == sorted(good + [corrupt])
    assert _mtimes(out) == before and not second.ok  # still-bad inputs keep the exit code non-zero

    # a new case: only it is predicted
    new = make_cohort(root, cases=1, start=7)[0]
    (root / new / f"{new}-seg.nii.gz").unlink()
    third = predict_cohort(root, trained_ensemble, out, progress=False, experiment=None)
    assert third.predicted == [new]
    changed = {k for k, v in _mtimes(out).items() if before.get(k) != v}
    assert changed == {f"{new}-seg.nii.gz"}

    # a changed input is predicted again; --force re-does all
    target = root / good[0] / f"{good[0]}-t2w.nii.gz"
    img = nib.load(target)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 1.01, img.affine, img.header), target)
    assert predict_cohort(root, trained_ensemble, out, progress=False, experiment=None).predicted == [good[0]]
    forced = predict_cohort(root, trained_ensemble, out, progress=False, experiment=None, force=True)
    assert sorted(forced.predicted) == sorted(good + [new])


def test_interrupted_run_leaves_no_partial_output_and_resumes(trained_ensemble, tmp_path, monkeypatch):
    from bratstune.ensemble.package import Ensemble

    root = tmp_path / "cohort"
    ids = make_cohort(root, cases=3, seed=9)
    out = tmp_path / "out"
    real = Ensemble.segment
    calls = {"n": 0}

    def flaky(self, data, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the batch
        return real(self, data, **kw)

    monkeypatch.setattr(Ensemble, "segment", flaky)
    with pytest.raises(KeyboardInterrupt):
        predict_cohort(root, trained_ensemble, out, progress=False, experiment=None)
    assert [p.name for p in out.glob("*.nii.gz")] == [f"{ids[0]}-seg.nii.gz"]
    assert not list(out.rglob(".*.tmp*"))
    monkeypatch.setattr(Ensemble, "segment", real)
    resumed = predict_cohort(root, trained_ensemble, out, progress=False, experiment=None)
    assert sorted(resumed.predicted) == sorted(ids[1:]) and resumed.skipped == [ids[0]] and resumed.ok


def test_drift_is_flagged_but_predicted(trained_ensemble, tmp_path):
    root = tmp_path / "cohort"
    ids = make_cohort(root, cases=2, seed=21)
    odd = ids[1]
    for path in (root / odd).glob("*.nii.gz"):  # 30x brighter, X and Y axes reversed: another scanner/pipeline
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        flip = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
        data = data if path.name.endswith("-seg.nii.gz") else data * 30.0
        nib.save(nib.Nifti1Image(data, flip, img.header), path)
    out = tmp_path / "out"
    summary = predict_cohort(root, trained_ensemble, out, progress=False, experiment=None)
    assert summary.ok and sorted(summary.predicted) == sorted(ids)
    assert summary.flagged == [odd]
    drift = {r["case_id"]: r["drift"] for r in _csv(out / "predictions.csv")}
    assert drift[ids[0]] == ""
    assert "orientation RAS (trained on LPS)" in drift[odd] and "t1n intensity" in drift[odd]
    assert "drift:" in (out / "report.html").read_text()


def test_cli_exit_codes_and_watch(trained_ensemble, mixed_cohort, tmp_path, capsys):
    from bratstune.cli import main

    root, good, *_ = mixed_cohort
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--cohort",
            str(root),
            "--model",
            str(trained_ensemble),
            "--out",
            str(out),
            "--no-mlflow",
            "--no-progress",
        ]
    )
    assert code == 1
    text = capsys.readouterr().out
    assert "3 predicted" in text and "FAILED" in text
    good_root = tmp_path / "good"
    make_cohort(good_root, cases=1, seed=4)
    code = main(
        [
            "predict",
            "--watch",
            str(good_root),
            "--interval",
            "0",
            "--max-polls",
            "2",
            "--settle",
            "0",
            "--model",
            str(trained_ensemble),
            "--out",
            str(tmp_path / "out2"),
            "--no-mlflow",
            "--no-progress",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "1 predicted" in text and "0 predicted, 1 already done" in text
    assert main(["predict", "--cohort", str(root), "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
