"""Plausibility flags on every prediction: per case, per cohort, in predictions.csv, report.html and the summary.

The end-to-end test plants a whole-brain prediction and an empty one with two real packages
(a tiny unet whose output layer is set to a constant +20 or -20 logit, saved and loaded through
``ensemble.json`` and the manifest) and runs the real batch prediction on real NIfTI files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from bratstune.errors import ConfigError
from bratstune.predict.plausibility import (
    PlausibilityRules,
    case_flags,
    cohort_flags,
    oof_statistics,
    oof_statistics_from_rows,
)

TINY = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
    "data": {"patch_size": [24, 24, 24]},
    "challenge": "GLI",
}


def _brain(shape=(20, 20, 20)) -> np.ndarray:
    brain = np.zeros(shape, dtype=bool)
    brain[2:18, 2:18, 2:18] = True  # 4096 voxels
    return brain


def _lesion(labels: np.ndarray, corner: tuple[int, int, int], size: int = 3, value: int = 2) -> np.ndarray:
    x, y, z = corner
    labels[x : x + size, y : y + size, z : z + size] = value
    return labels


def _plausible() -> np.ndarray:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    _lesion(labels, (6, 6, 6), 5, 2)
    _lesion(labels, (7, 7, 7), 3, 1)
    labels[8, 8, 8] = 3
    return labels


# --- per case ---------------------------------------------------------------------------------


def test_a_plausible_prediction_has_no_flag():
    assert case_flags(_plausible(), _brain(), "brats2023") == []


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: np.zeros((20, 20, 20), np.uint8), "empty prediction"),
        (lambda: _brain().astype(np.uint8) * 2, "whole tumour covers 100% of the brain mask"),
        (lambda: _lesion(_plausible(), (0, 0, 0), 2, 2), "8 labelled voxel(s)"),  # 8 of ~134 outside
    ],
)
def test_case_flags(make, expected):
    rules = PlausibilityRules(min_outside_voxels=5)
    flags = case_flags(make(), _brain(), "brats2023", rules=rules)
    assert any(expected in f for f in flags), flags


def test_whole_tumour_share_is_configurable():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:18, 2:18, 2:8] = 2  # 1536 of 4096 brain voxels = 37.5 %
    assert any("37%" in f or "38%" in f for f in case_flags(labels, _brain(), "brats2023"))
    assert case_flags(labels, _brain(), "brats2023", rules=PlausibilityRules(max_brain_share=0.5)) == []


def test_et_without_tc_comes_from_the_dropped_probabilities():
    hierarchy = {
        "TC": {"parent": "WT", "predicted": 30, "dropped": 0},
        "ET": {"parent": "TC", "predicted": 100, "dropped": 60},
    }
    flags = case_flags(_plausible(), _brain(), "brats2023", hierarchy=hierarchy)
    assert flags == ["ET without TC: 60 of 100 ET voxels (60%) lie outside the predicted TC"]
    few = {"ET": {"parent": "TC", "predicted": 12, "dropped": 5}}  # under min_dropped_voxels
    assert case_flags(_plausible(), _brain(), "brats2023", hierarchy=few) == []


def test_unusual_component_counts_use_the_out_of_fold_maximum():
    labels = np.zeros((20, 20, 20), np.uint8)
    for i in range(4):  # four separate ED lesions
        _lesion(labels, (3 + 4 * i, 3, 3), 2, 2)
    assert case_flags(labels, _brain(), "brats2023") == []  # default limit 20
    assert case_flags(labels, _brain(), "brats2023", rules=PlausibilityRules(max_components=3)) == [
        "4 WT components (unusual: more than 3)"
    ]
    oof = {"lesions": {"WT": {"max": 1.0}}}  # the model never predicted more than one WT lesion
    flags = case_flags(labels, _brain(), "brats2023", oof=oof, rules=PlausibilityRules(component_factor=1.0))
    assert flags == ["4 WT components (unusual: more than 3)"]  # ceil(1.0 x 1) + 2
    assert case_flags(labels, _brain(), "brats2023", oof={"lesions": {"WT": {"max": 2.0}}}) == []  # limit 6


def test_rules_validate_and_read_mappings():
    assert PlausibilityRules.from_mapping({"max_brain_share": 0.2}).max_brain_share == 0.2
    with pytest.raises(ConfigError, match="max_brain_shares"):
        PlausibilityRules.from_mapping({"max_brain_shares": 0.2})
    with pytest.raises(ConfigError, match="max_brain_share"):
        PlausibilityRules(max_brain_share=1.5)
    with pytest.raises(ConfigError, match="max_components"):
        PlausibilityRules(max_components=-1)


# --- out-of-fold statistics and the cohort --------------------------------------------------


def test_oof_statistics_summarise_volumes_and_lesion_counts():
    maps = [_plausible(), _lesion(np.zeros((20, 20, 20), np.uint8), (2, 2, 2), 4, 2)]
    stats = oof_statistics(iter(maps), [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0)], scheme="brats2023")
    assert stats["cases"] == 2 and stats["scheme"] == "brats2023"
    # case 1: WT = 125 voxels of 1 mm^3; case 2: 64 voxels of 8 mm^3 = 512 mm^3
    assert stats["volume_ml"]["WT"]["values"] == [0.125, 0.512]
    assert stats["volume_ml"]["WT"]["min"] == 0.125 and stats["volume_ml"]["WT"]["max"] == 0.512
    assert stats["lesions"]["ET"]["values"] == [1.0, 0.0]
    with pytest.raises(ValueError):
        oof_statistics([maps[0]], [], scheme="brats2023")


def _rows(volumes, lesions=1):
    return [
        {
            "volume_WT_ml": v,
            "lesions_WT": lesions,
            "volume_TC_ml": 1,
            "lesions_TC": 1,
            "volume_ET_ml": 1,
            "lesions_ET": 1,
        }
        for v in volumes
    ]


def test_cohort_flags_compare_with_the_out_of_fold_distribution():
    oof = oof_statistics_from_rows(_rows(np.linspace(20, 80, 30)), "brats2023")
    assert cohort_flags(_rows([30, 45, 60, 50, 40]), "brats2023", oof) == []
    flags = cohort_flags(_rows([2400, 2300, 2500, 45, 2600]), "brats2023", oof)
    assert any(f.startswith("cohort median WT volume 2400.0 mL is outside") for f in flags), flags
    assert any(f.startswith("4 of 5 cases (80%) have a WT volume outside") for f in flags), flags
    assert cohort_flags(_rows([2400] * 3), "brats2023", oof) == []  # fewer than cohort_min_cases
    assert cohort_flags(_rows([2400] * 5), "brats2023", {}) == []  # no out-of-fold statistics


# --- end to end: planted whole-brain and empty predictions -----------------------------------


def _constant_package(folder: Path, logit: float, fingerprint: dict, oof: dict) -> Path:
    from bratstune.ensemble.member import Member
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig
    from bratstune.labels import scheme_for
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    config = resolve_config(load_train_config(TINY))
    torch.manual_seed(0)
    model = build_network(config, scheme_for("GLI")).eval()
    head = model.output_block.conv.conv  # the full-resolution 1x1x1 output convolution
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(logit)
    ensemble = Ensemble.from_members(
        [Member("planted", config, model)],
        scheme="brats2023",
        challenge="GLI",
        inference=InferenceConfig(overlap=0.25),
        training_fingerprint=fingerprint,
        oof_statistics=oof,
    )
    return ensemble.save(folder)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 3-case cohort, and two saved packages: one labels the whole brain, one nothing."""
    from bratstune.data.cache import CaseCache
    from bratstune.data.fingerprint import training_fingerprint
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import PreprocessConfig
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("plausibility")
    ids = generate_cohort(
        root / "cohort", challenge="GLI", cases=3, shape=(32, 32, 32), anatomy="procedural", seed=9, workers=1
    )
    cases = CaseCache(root / "cache").prepare(discover(root / "cohort").cases, PreprocessConfig())
    fingerprint = training_fingerprint(c.fingerprint for c in cases)
    oof = oof_statistics_from_rows(_rows(np.linspace(20, 80, 30), lesions=1), "brats2023")
    whole = _constant_package(root / "whole-brain", 20.0, fingerprint, oof)
    empty = _constant_package(root / "empty", -20.0, fingerprint, oof)
    return root / "cohort", ids, whole, empty


def _csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["case_id"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_planted_whole_brain_and_empty_predictions_are_flagged(planted, tmp_path):
    from bratstune.ensemble.package import Ensemble
    from bratstune.predict.batch import predict_cohort

    cohort, ids, whole, empty = planted
    assert Ensemble.load(whole).oof_statistics["cases"] == 30  # recorded in the package, read back
    options = {"progress": False, "experiment": None, "plausibility": {"cohort_min_cases": 2}}

    big = predict_cohort(cohort, whole, tmp_path / "whole", **options)
    assert big.ok and sorted(big.implausible) == sorted(ids)  # flagged, never stopped
    rows = _csv(tmp_path / "whole" / "predictions.csv")
    for case_id in ids:
        flags = rows[case_id]["plausibility"]
        assert "whole tumour covers" in flags and "outside the brain mask" in flags, flags
        assert (tmp_path / "whole" / f"{case_id}-seg.nii.gz").is_file()
    assert any("cohort median WT volume" in f for f in big.cohort_flags), big.cohort_flags
    html = (tmp_path / "whole" / "report.html").read_text()
    assert "Cohort flags" in html and "cohort median WT volume" in html
    for case_id in ids:  # its table row and its card carry the flag
        row = html.split(f"<a href='#{case_id}'>{case_id}</a>")[1].split("</tr>")[0]
        card = html.split(f"<div class='card' id='{case_id}'>")[1].split("</div><div class='card'")[0]
        assert "whole tumour covers" in row and "implausible: whole tumour covers" in card
    assert f"{len(ids)} implausible" in big.line()

    nothing = predict_cohort(cohort, empty, tmp_path / "empty", **options)
    assert nothing.ok and sorted(nothing.implausible) == sorted(ids)
    rows = _csv(tmp_path / "empty" / "predictions.csv")
    assert all(rows[c]["plausibility"] == "empty prediction (no tumour voxel)" for c in ids)
    assert float(rows[ids[0]]["volume_WT_ml"]) == 0.0
    html = (tmp_path / "empty" / "report.html").read_text()
    assert html.count("empty prediction (no tumour voxel)") >= 2 * len(ids)
    assert any("cohort median WT volume 0.0 mL" in f for f in nothing.cohort_flags), nothing.cohort_flags
