"""Tests of bratstune.data.cache: content keys, hit path without NIfTI decode, concurrency."""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bratstune.data import cache as cache_mod
from bratstune.data import layout
from bratstune.data.cache import CaseCache, default_cache_root
from bratstune.data.case import load_case
from bratstune.data.preprocess import PreprocessConfig, preprocess_case
from bratstune.errors import ConfigError

SHAPE = (24, 26, 20)


def _write_case(root: Path, index: int, *, seed: int | None = None) -> None:
    rng = np.random.default_rng(index if seed is None else seed)
    case_id = f"BraTS-GLI-{index:05d}-000"
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    brain = np.zeros(SHAPE, bool)
    brain[4:20, 3:22, 2:17] = True
    for c, modality in enumerate(("t1n", "t1c", "t2w", "t2f")):
        data = np.where(brain, rng.normal(100 + 30 * c, 15, SHAPE), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(data, affine), folder / f"{case_id}-{modality}.nii.gz")
    seg = np.zeros(SHAPE, np.uint8)
    r = 2 + index % 4
    seg[10 - r : 10 + r, 10 - r : 10 + r, 8 - r // 2 : 8 + r // 2 + 1] = 2
    seg[9:11, 9:11, 7:9] = 3
    seg[8:9, 9:11, 8:9] = 1
    nib.save(nib.Nifti1Image(seg, affine), folder / f"{case_id}-seg.nii.gz")


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "cohort"
    for i in range(3):
        _write_case(root, i)
    return layout.discover(root).cases


@pytest.fixture
def cache(tmp_path):
    return CaseCache(tmp_path / "cache")


def _forbid_nifti_decode(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("NIfTI decoded on a cache hit")

    monkeypatch.setattr(nib, "load", boom)
    monkeypatch.setattr(nib.loadsave, "load", boom)
    monkeypatch.setattr(cache_mod, "load_case", boom)
    monkeypatch.setattr(gzip.GzipFile, "__init__", boom)


def test_miss_then_hit_without_nifti_decode(cohort, cache, monkeypatch):
    config = PreprocessConfig(margin=1)
    first = cache.load(cohort[0], config)
    expected = preprocess_case(load_case(cohort[0]), config)
    np.testing.assert_array_equal(first.image, expected.image)
    np.testing.assert_array_equal(first.label, expected.label)
    assert first.bbox == expected.bbox and first.original_shape == SHAPE
    assert first.fingerprint == json.loads(json.dumps(expected.fingerprint))

    _forbid_nifti_decode(monkeypatch)
    again = CaseCache(cache.root).load(cohort[0], config)  # fresh object: memo read from disk
    assert isinstance(again.image, np.memmap) and isinstance(again.label, np.memmap)
    assert again.image.dtype == np.float32 and again.label.dtype == np.uint8
    assert again.image.shape == (4, *expected.shape)
    np.testing.assert_array_equal(again.image, expected.image)
    assert again.case_id == cohort[0].case_id and again.bbox == expected.bbox
    np.testing.assert_allclose(again.affine, expected.affine)
    assert again.config_fingerprint == config.fingerprint()


def test_unchanged_files_are_not_rehashed(cohort, cache, monkeypatch):
    key = cache.key(cohort[0], PreprocessConfig())
    monkeypatch.setattr(cache_mod, "file_digest", lambda path: pytest.fail(f"re-hashed {path}"))
    assert CaseCache(cache.root).key(cohort[0], PreprocessConfig()) == key


def test_key_changes_with_content_and_config(cohort, cache, tmp_path):
    config = PreprocessConfig()
    key = cache.key(cohort[0], config)
    assert cache.key(cohort[0], PreprocessConfig(margin=2)) != key
    assert cache.key(cohort[0], PreprocessConfig(percentile_rescale=(2, 98))) != key
    assert cache.key(cohort[1], config) != key
    before = cache.load(cohort[0], config)
    old_sum = float(np.sum(before.image))

    # same bytes, new mtime: re-hashed, same key
    t1n = cohort[0].images["t1n"]
    os.utime(t1n, ns=(t1n.stat().st_atime_ns, t1n.stat().st_mtime_ns + 10**9))
    assert cache.key(cohort[0], config) == key

    # new content in one modality: new key, new arrays
    _write_case(t1n.parent.parent, 0, seed=99)
    new_key = cache.key(cohort[0], config)
    assert new_key != key
    after = cache.load(cohort[0], config)
    assert float(np.sum(after.image)) != pytest.approx(old_sum)
    assert (cache.entry_dir(key) / "meta.json").is_file() and (cache.entry_dir(new_key) / "meta.json").is_file()


def test_loser_of_a_race_keeps_the_winner(cohort, cache):
    config = PreprocessConfig()
    winner = cache.load(cohort[0], config)
    key = cache.key(cohort[0], config)
    reference = np.array(winner.image)
    garbage = preprocess_case(load_case(cohort[1]), config)
    assert cache._store(key, garbage, config) == 0  # the rename loses: nothing replaced
    np.testing.assert_array_equal(CaseCache(cache.root).load(cohort[0], config).image, reference)
    assert not any((cache.root / "tmp").iterdir())


def _prepare_in_process(root: str, cohort_root: str, barrier) -> int:
    cases = layout.discover(cohort_root).cases
    barrier.wait()
    out = CaseCache(root).prepare(cases, PreprocessConfig())
    return len(out)


@pytest.mark.slow
def test_concurrent_prepare_is_safe(cohort, cache):
    ctx = multiprocessing.get_context("spawn")
    cohort_root = str(Path(cohort[0].images["t1n"]).parent.parent)
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            counts = pool.starmap(_prepare_in_process, [(str(cache.root), cohort_root, barrier)] * 3)
    assert counts == [3, 3, 3]
    entries = list((cache.root / "entries").glob("*/*"))
    assert len(entries) == 3
    assert all(sorted(p.name for p in e.iterdir()) == ["image.npy", "label.npy", "meta.json"] for e in entries)
    assert not any((cache.root / "tmp").iterdir())
    for case in cohort:
        expected = preprocess_case(load_case(case), PreprocessConfig())
        np.testing.assert_array_equal(cache.load(case, PreprocessConfig()).image, expected.image)


@pytest.mark.slow
def test_prepare_with_workers_keeps_order_and_logs(cohort, cache, caplog):
    caplog.set_level(logging.INFO, logger="bratstune.data.cache")
    out = cache.prepare(cohort, PreprocessConfig(), workers=2)
    assert [c.case_id for c in out] == [c.case_id for c in cohort]
    assert all(isinstance(c.image, np.memmap) for c in out)
    assert "s/case" in caplog.text and "MB written" in caplog.text
    caplog.clear()
    cache.prepare(cohort, PreprocessConfig(), workers=2)
    assert "3/3 cases cached, preparing 0" in caplog.text


def test_cohort_histogram_matching(cohort, cache, monkeypatch):
    config = PreprocessConfig(histogram_match="cohort")
    with pytest.raises(ConfigError, match="prepare"):
        cache.load(cohort[0], config)
    out = cache.prepare(cohort, config)
    assert cache.reference_path(config).is_file()
    # every case now shares the reference's brain quantiles
    medians = [np.median(c.image[1][c.image[1] != 0]) for c in out]
    assert np.ptp(medians) < 0.05
    _forbid_nifti_decode(monkeypatch)
    again = CaseCache(cache.root).load(cohort[2], config)
    np.testing.assert_array_equal(again.image, out[2].image)


def test_unlabelled_case(tmp_path, cache):
    _write_case(tmp_path / "c", 0)
    next((tmp_path / "c").rglob("*-seg.nii.gz")).unlink()
    case = layout.discover(tmp_path / "c").cases[0]
    out = cache.load(case, PreprocessConfig())
    assert out.label is None
    assert not (cache.entry_dir(cache.key(case, PreprocessConfig())) / "label.npy").exists()
    assert CaseCache(cache.root).load(case, PreprocessConfig()).label is None


def test_default_root_is_lazy_and_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BRATSTUNE_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_root() == (tmp_path / "elsewhere").resolve()
    assert CaseCache().root == (tmp_path / "elsewhere").resolve()
    assert not (tmp_path / "elsewhere").exists()  # nothing is created until something is stored
