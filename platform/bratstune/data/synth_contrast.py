"""Contrasts for the synthetic cohort: tissue/tumour intensities, bias, noise, domain shift.

Healthy tissue: the warped T1-like template is mapped per modality by a piecewise-linear
*intensity transfer* through the three tissue class means (CSF, GM, WM) -> the relative
intensities in `TISSUE`, which keeps the atlas' partial-volume texture in all four contrasts.
Tumour compartments are mixed in with their soft weights (`synth_tumour.soft`) at the
relative intensities in `COMPARTMENT`:

=========  =====  =====  =====  =====
           t1n    t1c    t2w    t2f
=========  =====  =====  =====  =====
CSF        dark   dark   bright dark
WM > GM    yes    yes    no     no
ET         ~GM    bright ~GM    mod.
NCR        dark   dark   bright mod.
ED         dark   dark   bright bright
CC (cyst)  dark   dark   bright dark
=========  =====  =====  =====  =====

Then per modality: optional domain degradation (SSA: blur + resample to a coarser grid,
contrast compression), a smooth multiplicative bias field, a per-case gain and Rician
noise ``sqrt((x + σ n1)^2 + (σ n2)^2)``; everything outside the head mask is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bratstune.data.synth_anatomy import Grid, resample_matrix, resample_separable, smooth_field, tissue_fractions
from bratstune.data.synth_tumour import TumourFields, soft

MODALITIES = ("t1n", "t1c", "t2w", "t2f")

#: relative intensity of (CSF, GM, WM) per modality
TISSUE = {
    "t1n": (0.30, 0.62, 0.86),
    "t1c": (0.30, 0.63, 0.84),
    "t2w": (1.45, 0.74, 0.52),
    "t2f": (0.20, 0.80, 0.60),
}
#: relative intensity of tumour compartments per modality (order t1n, t1c, t2w, t2f)
COMPARTMENT = {
    "NCR": (0.34, 0.30, 1.25, 0.75),
    "ET": (0.58, 1.35, 0.88, 0.95),
    "MEN_ET": (0.62, 1.30, 0.80, 0.85),
    "ED": (0.55, 0.55, 1.08, 1.25),
    "NET": (0.50, 0.52, 1.12, 1.05),
    "CC": (0.24, 0.26, 1.45, 0.40),
}


@dataclass(frozen=True)
class Domain:
    """Acquisition of one case: relative noise, bias amplitude, contrast factor, resolution (mm)."""

    noise: float
    bias: float
    contrast: float = 1.0
    resolution_mm: tuple[float, float, float] | None = None


def sample_domain(challenge: str, rng: np.random.Generator) -> Domain:
    """SSA: lower resolution (thick slices), lower contrast, more noise; others: clean 3T-like."""
    if challenge == "SSA":
        inplane = rng.uniform(2.2, 3.2)
        return Domain(
            noise=rng.uniform(0.045, 0.07),
            bias=rng.uniform(0.1, 0.25),
            contrast=rng.uniform(0.7, 0.85),
            resolution_mm=(inplane, inplane, rng.uniform(4.5, 6.0)),
        )
    return Domain(noise=rng.uniform(0.015, 0.03), bias=rng.uniform(0.05, 0.15))


def _transfer(t1: np.ndarray, means, values) -> np.ndarray:
    """Piecewise-linear map of T1-like intensity through the class means to `values`."""
    m = np.asarray(means, float)
    v = np.asarray(values, float)
    knots = np.concatenate([[m[0] - (m[1] - m[0])], m, [m[2] + (m[2] - m[1])]])
    vals = np.concatenate([[v[0] - (v[1] - v[0])], v, [v[2] + (v[2] - v[1])]])
    vals = np.clip(vals, 0.4 * v.min(), 1.15 * v.max())
    return np.interp(t1, knots, vals).astype(np.float32)


def _degrade(img: np.ndarray, grid: Grid, resolution_mm) -> np.ndarray:
    """Blur to `resolution_mm`, sample on that coarser grid and interpolate back (linear)."""
    mats = []
    for n, sp, res in zip(grid.shape, grid.spacing, resolution_mm):
        q = max(res / sp, 1.5)  # at least 1.5x coarser than the output grid, visible at any shape
        n_low = int(np.ceil(n / q))
        down = resample_matrix(n, (np.arange(n_low) + 0.5) * q - 0.5, 0.45 * q)
        up = resample_matrix(n_low, (np.arange(n) + 0.5) / q - 0.5, 0.0)
        mats.append(up @ down)
    return resample_separable(img, mats)


def render(
    challenge: str,
    t1: np.ndarray,
    brain: np.ndarray,
    means: tuple[float, float, float],
    fields: TumourFields,
    grid: Grid,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four contrasts and the label map of one case (labels in the challenge's 2023+ scheme).

    Returns:
        images: modality -> float32 (X, Y, Z), exactly 0 outside the head mask.
        seg: uint8 (X, Y, Z); GLI/SSA/MEN/MET 1 NCR, 2 ED, 3 ET; PED 1 ET, 2 NET, 3 CC, 4 ED.
    """
    frac = tissue_fractions(t1, means)
    brain_f = brain.astype(np.float32)
    extra_axial = any(les.extra_axial for les in fields.lesions)
    s_core = soft(fields.core)
    if not extra_axial:
        s_core *= brain_f
    head = brain | (s_core > 0.5)
    s_ncr = soft(fields.ncr)
    oedema_ok = np.clip((0.85 - frac[0]) / 0.5, 0, 1) * brain_f  # oedema spares the ventricles
    s_ed = soft(fields.ed - 0.3 * (frac[2] - 0.5)) * oedema_ok  # and spreads along white matter

    seg = np.zeros(grid.shape, np.uint8)
    weights: dict[str, np.ndarray] = {}
    if challenge == "PED":
        s_cc = soft(fields.cyst) * brain_f
        s_et = soft(1.0 - fields.patch)
        rest = 1.0 - s_cc
        weights["CC"] = s_cc
        weights["ET"] = rest * s_core * s_et
        weights["NET"] = rest * s_core * (1.0 - s_et)
        weights["ED"] = rest * (1.0 - s_core) * s_ed
        core = s_core > 0.5
        seg[(s_ed > 0.5) & ~core] = 4
        seg[core] = 2
        seg[core & (s_et > 0.5)] = 1
        seg[s_cc > 0.5] = 3
    else:
        weights["NCR"] = s_core * s_ncr
        weights["MEN_ET" if challenge == "MEN" else "ET"] = s_core * (1.0 - s_ncr)
        weights["ED"] = (1.0 - s_core) * s_ed
        core = s_core > 0.5
        seg[(s_ed > 0.5) & ~core] = 2
        seg[core] = 3
        seg[core & (s_ncr > 0.5)] = 1
    total = sum(weights.values())
    texture = 1.0 + 0.1 * smooth_field(rng, grid.shape, [5.0 / s for s in grid.spacing])[0]
    domain = sample_domain(challenge, rng)

    images: dict[str, np.ndarray] = {}
    for i, mod in enumerate(MODALITIES):
        values = np.asarray(TISSUE[mod]) * rng.uniform(0.93, 1.07, 3)
        base = _transfer(t1, means, values)
        img = base * (1.0 - total)
        for name, w in weights.items():
            v = COMPARTMENT[name][i] * rng.uniform(0.93, 1.07)
            part = (0.7 * v * texture + 0.3 * base) if name == "ED" else v * texture
            img += w * part
        if domain.resolution_mm is not None:
            img = _degrade(img * head, grid, domain.resolution_mm)
        if domain.contrast != 1.0:
            mu = float(img[head].mean()) if head.any() else 0.0
            img = mu + domain.contrast * (img - mu)
        bias = np.exp(domain.bias * smooth_field(rng, grid.shape, [90.0 / s for s in grid.spacing])[0])
        img = img * bias * np.float32(1000.0 * np.exp(rng.uniform(-0.4, 0.4)))
        sigma = np.float32(domain.noise * (float(np.median(img[head])) if head.any() else 1.0))
        n1 = rng.standard_normal(grid.shape, dtype=np.float32)
        n2 = rng.standard_normal(grid.shape, dtype=np.float32)
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
        images[mod] = np.where(head, img, 0).astype(np.float32)
    return images, seg
