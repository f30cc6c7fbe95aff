"""Data-pipeline timings: cohort generation, NIfTI vs cache loads, patch throughput.

Usage::

    python benchmarks/data_pipeline.py [--cases 4] [--patch 48] [--patches 64] [--workers 2]

Writes a synthetic cohort (``bratstune.data.synthetic.generate_cohort`` at its default size,
about 120 x 120 x 78 voxels; plain random phantoms if that module is missing) into a temporary
folder and prints:

* generation time per case;
* time to load a case from NIfTI (``load_case`` + ``preprocess_case``) vs from the cache
  (``CaseCache.load`` + a sum over the arrays, so the pages are really read), and the ratio;
* patches per second from ``PatchDataset`` through ``DataLoader(num_workers=...)``, without
  and with the default augmentation.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _fallback_cohort(out: Path, cases: int, shape: tuple[int, int, int] = (120, 120, 78)) -> list[str]:
    """Ellipsoid 'brains' with a spherical tumour, BraTS 2023 naming (when synthetic is missing)."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    brain = (((grid - centre) / (centre * 0.8)) ** 2).sum(0) < 1
    ids = []
    for i in range(cases):
        case_id = f"BraTS-GLI-{i:05d}-000"
        folder = out / case_id
        folder.mkdir(parents=True)
        c = centre[:, 0, 0, 0] + rng.integers(-15, 15, 3)
        dist = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
        seg = np.where(dist < 14, 2, 0) + np.where(dist < 8, 1, 0)
        seg = np.where(dist < 4, 3, seg).astype(np.uint8) * brain
        for m, modality in enumerate(("t1n", "t1c", "t2w", "t2f")):
            img = np.where(brain, rng.normal(300 + 100 * m, 40, shape) + 80 * seg, 0).astype(np.float32)
            nib.save(nib.Nifti1Image(img, np.eye(4)), folder / f"{case_id}-{modality}.nii.gz")
        nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / f"{case_id}-seg.nii.gz")
        ids.append(case_id)
    return ids


def _generate(out: Path, cases: int) -> tuple[list[str], str]:
    try:
        from bratstune.data.synthetic import generate_cohort
    except ImportError:
        return _fallback_cohort(out, cases), "fallback phantoms (bratstune.data.synthetic missing)"
    return list(generate_cohort(out, cases=cases)), "bratstune.data.synthetic.generate_cohort"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="cases to generate (default 4)")
    parser.add_argument("--patch", type=int, default=48, help="patch edge in voxels (default 48)")
    parser.add_argument("--patches", type=int, default=64, help="patches per throughput run (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from torch.utils.data import DataLoader

    from bratstune.data.augment import AugmentConfig, build_augment
    from bratstune.data.cache import CaseCache
    from bratstune.data.case import load_case
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import PreprocessConfig, preprocess_case
    from bratstune.data.sampling import PatchDataset

    torch.set_num_threads(args.threads)
    config = PreprocessConfig()
    with tempfile.TemporaryDirectory(prefix="bratstune-bench-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        ids, source = _generate(tmp_path / "cohort", args.cases)
        gen = (time.perf_counter() - t0) / max(len(ids), 1)
        cases = discover(tmp_path / "cohort").cases
        probe = load_case(cases[0])
        print(f"cohort: {len(cases)} cases from {source}, shape {probe.image.shape[1:]}, spacing {probe.spacing} mm")
        print(f"generation:           {gen:8.3f} s/case")

        def from_nifti() -> None:
            pre = preprocess_case(load_case(cases[0]), config)
            float(pre.image.sum())

        cache = CaseCache(tmp_path / "cache")
        t0 = time.perf_counter()
        prepared = cache.prepare(cases, config, workers=1)
        fill = (time.perf_counter() - t0) / len(cases)

        def from_cache() -> None:
            pre = CaseCache(cache.root).load(cases[0], config)
            float(pre.image.sum()) + float(pre.label.sum())

        nifti_s = _median_time(from_nifti, 3)
        cache_s = _median_time(from_cache, 5)
        print(f"cache fill (1 proc):  {fill:8.3f} s/case (decode + preprocess + hash + write)")
        print(f"load from NIfTI:      {nifti_s * 1e3:8.1f} ms/case (load_case + preprocess_case + sum)")
        print(f"load from cache:      {cache_s * 1e3:8.1f} ms/case (CaseCache.load + sum over image and label)")
        print(f"speed-up:             {nifti_s / cache_s:8.1f} x")
        print(f"cropped shape:        {prepared[0].shape} (of {prepared[0].original_shape})")

        for name, transform in (("no augmentation", None), ("default augmentation", build_augment(AugmentConfig()))):
            ds = PatchDataset(prepared, args.patch, samples_per_epoch=args.patches, transform=transform)
            loader = DataLoader(ds, batch_size=2, num_workers=args.workers, persistent_workers=False)
            t0 = time.perf_counter()
            n = sum(batch["image"].shape[0] for batch in loader)
            rate = n / (time.perf_counter() - t0)
            print(
                f"patches ({name}): {rate:8.1f} patches/s  "
                f"({args.patch}^3, num_workers={args.workers}, {n} patches, worker start-up included)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
