"""Fixtures for batch prediction: one tiny trained ensemble (session) and cohorts on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_ensemble(tmp_path_factory) -> Path:
    """A one-member ensemble folder: a unet [8, 16, 32] fitted for 2 x 6 steps on 5 procedural 32^3 GLI cases.

    It records the training cases' fingerprint, so the drift check has a reference.
    """
    from bratstune.data.cache import CaseCache
    from bratstune.data.cohort import TrainData
    from bratstune.data.fingerprint import training_fingerprint
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import PreprocessConfig
    from bratstune.data.synthetic import generate_cohort
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig
    from bratstune.labels import scheme_for
    from bratstune.training.fit import fit

    root = tmp_path_factory.mktemp("train")
    generate_cohort(
        root / "raw", challenge="GLI", cases=5, shape=(32, 32, 32), anatomy="procedural", seed=11, workers=1
    )
    cases = CaseCache(root / "cache").prepare(discover(root / "raw").cases, PreprocessConfig())
    config = {
        "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
        "optim": {"lr": 1.0e-2},
        "data": {"patch_size": 24, "num_workers": 0},
        "epochs": 2,
        "steps_per_epoch": 6,
        "num_threads": 1,
        "device": "cpu",
        "amp": "off",
        "challenge": "GLI",
        "validation": {"lesion_metrics": False},
    }
    result = fit(config, TrainData(train=cases[:4], val=cases[4:], scheme=scheme_for("GLI")), out_dir=root / "fit")
    ensemble = Ensemble.from_members(
        [result],
        scheme="brats2023",
        challenge="GLI",
        inference=InferenceConfig(overlap=0.25, flips=True),
        training_fingerprint=training_fingerprint(c.fingerprint for c in cases),
        metrics={"val/dice_mean": result.best_metric},
        lineage={"data_fingerprint": "test"},
    )
    return ensemble.save(root / "ensemble")


def make_cohort(folder: Path, *, cases: int = 3, start: int = 0, seed: int = 5) -> list[str]:
    from bratstune.data.synthetic import generate_cohort

    return generate_cohort(
        folder,
        challenge="GLI",
        cases=cases,
        shape=(32, 32, 32),
        anatomy="procedural",
        seed=seed,
        start_index=start,
        workers=1,
    )


@pytest.fixture()
def mixed_cohort(tmp_path) -> tuple[Path, list[str], str, str]:
    """3 good cases, one lacking its FLAIR, one with a corrupt (truncated gzip) T1c file."""
    root = tmp_path / "cohort"
    ids = make_cohort(root, cases=5)
    good, missing, corrupt = ids[:3], ids[3], ids[4]
    (root / missing / f"{missing}-t2f.nii.gz").unlink()
    bad = root / corrupt / f"{corrupt}-t1c.nii.gz"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    for case_id in ids:  # prediction inputs: no reference segmentations needed
        (root / case_id / f"{case_id}-seg.nii.gz").unlink()
    return root, good, missing, corrupt


@pytest.fixture()
def mlflow_uri(tmp_path_factory, monkeypatch) -> str:
    uri_db = tmp_path_factory.getbasetemp() / "predict-mlflow.db"
    uri = f"sqlite:///{uri_db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
