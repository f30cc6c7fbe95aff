"""`bratstune evaluate` on real NIfTI files: one case, a synthetic cohort, post-processing."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from bratstune import cli
from bratstune.commands import evaluate as evaluate_cmd
from bratstune.metrics import PROTOCOLS


def _save(path, array, spacing=(1.0, 1.0, 1.0), affine=None):
    affine = np.diag(list(spacing) + [1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))


def _tumour(shape=(32, 32, 24)):
    seg = np.zeros(shape, np.uint8)
    seg[8:24, 8:24, 6:18] = 2
    seg[11:21, 11:21, 8:16] = 1
    seg[13:19, 13:19, 10:14] = 3
    return seg


def _noisy(seg, rng, dust=6):
    """A prediction: the GT with an NCR hole in the core and dust voxels around."""
    pred = seg.copy()
    pred[15, 15, 9] = 0  # hole inside TC (NCR)
    for _ in range(dust):
        idx = tuple(int(rng.integers(0, n)) for n in seg.shape)
        if pred[idx] == 0:
            pred[idx] = int(rng.integers(1, 4))
    return pred


def test_protocol_choices_match_the_library():
    assert evaluate_cmd.PROTOCOLS == PROTOCOLS


def test_single_case_json(tmp_path, capsys):
    gt = _tumour()
    _save(tmp_path / "gt.nii.gz", gt)
    _save(tmp_path / "pred.nii.gz", _noisy(gt, np.random.default_rng(0)))
    out = tmp_path / "m.json"
    rc = cli.main(
        [
            "evaluate",
            "--pred",
            str(tmp_path / "pred.nii.gz"),
            "--gt",
            str(tmp_path / "gt.nii.gz"),
            "--challenge",
            "GLI",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "brats2023" and doc["challenge"] == "GLI"
    assert set(doc["regions"]) == {"WT", "TC", "ET"}
    for key in ("lesionwise_dice", "lesionwise_hd95", "legacy_dice", "legacy_hd95", "num_tp", "num_fp", "num_fn"):
        assert key in doc["regions"]["WT"]
    assert "LW Dice" in capsys.readouterr().out


def test_brats2026_regions_in_capitals(tmp_path):
    gt = _tumour()
    _save(tmp_path / "gt.nii.gz", gt)
    _save(tmp_path / "pred.nii.gz", gt)
    out = tmp_path / "m.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred.nii.gz"),
                "--gt",
                str(tmp_path / "gt.nii.gz"),
                "--challenge",
                "GLI",
                "--protocol",
                "brats2026",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    regions = json.loads(out.read_text())["regions"]
    assert set(regions) == {"NETC", "SNFH", "ET", "RC", "TC", "WT"}
    assert regions["WT"]["lesionwise_dice"] == 1.0 and math.isnan(regions["RC"]["lesionwise_dice"])


@pytest.mark.slow
def test_synthetic_cohort_with_and_without_postprocessing(tmp_path, capsys):
    from bratstune.data.layout import discover
    from bratstune.data.synthetic import generate_cohort

    cohort_dir = tmp_path / "cohort"
    generate_cohort(cohort_dir, challenge="GLI", cases=4, shape=(60, 60, 39), anatomy="procedural", seed=3, workers=1)
    preds = tmp_path / "preds"
    preds.mkdir()
    rng = np.random.default_rng(0)
    for case in discover(cohort_dir).cases:
        img = nib.load(str(case.label))
        gt = np.asarray(img.dataobj).astype(np.uint8)
        _save(preds / f"{case.case_id}.nii.gz", _noisy(gt, rng, dust=15), affine=img.affine)  # the GT's grid
    out = tmp_path / "report"
    rc = cli.main(
        [
            "evaluate",
            "--pred",
            str(preds),
            "--gt",
            str(cohort_dir),
            "--challenge",
            "GLI",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "all.json"),
            "--postprocess",
            "min_size_ET=10,min_size_TC=10,min_size_WT=10",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "LW Dice (pp)" in printed
    print(printed)
    doc = json.loads((tmp_path / "all.json").read_text())
    assert len(doc["cases"]) == 4 and (out / "summary.csv").exists() and (out / "summary_postprocessed.csv").exists()
    raw, pp = doc["summary"], doc["postprocessed"]["summary"]
    for region in ("WT", "TC", "ET"):  # dust removal removes the false positives
        assert pp[region]["lesionwise_dice"] >= raw[region]["lesionwise_dice"]
        assert pp[region]["num_fp"] <= raw[region]["num_fp"]


def test_missing_prediction_is_a_data_error(tmp_path, capsys):
    gts = tmp_path / "gt"
    preds = tmp_path / "pred"
    gts.mkdir()
    preds.mkdir()
    _save(gts / "BraTS-GLI-00001-000-seg.nii.gz", _tumour())
    _save(preds / "BraTS-GLI-00002-000.nii.gz", _tumour())
    rc = cli.main(["evaluate", "--pred", str(preds), "--gt", str(gts), "--challenge", "GLI"])
    assert rc == 2
    assert "no prediction for 1 case" in capsys.readouterr().err
