"""Tumours for the synthetic cohort: per-challenge lesion sampling and label fields.

A lesion is a union of ellipsoidal *blobs* whose normalised radius is perturbed by smooth
noise (lobulated, never a sphere). Rasterising a lesion writes continuous fields on the
output grid, each crossing 1 at a compartment boundary:

* ``core``  (tumour core: NCR + ET, or the whole PED tumour),
* ``ncr``   (necrosis inside the core; ring enhancement = core minus ncr),
* ``ed``    (oedema halo: a wider, noisier copy of the core field),
* ``cyst``  and ``patch`` (PED: cystic component; patchy enhancement, positive = ET).

Soft weights ``0.5 - 0.5·tanh((F - 1)/τ)`` of those fields give the partial-volume mixing
used by the contrast model, and thresholding the same weights at 0.5 gives the labels, so
image and label boundaries agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bratstune.data.synth_anatomy import Grid, MassEffect, Template, _rotation, smooth_field

BIG = np.float32(9.0)  # "far outside" value of every field
TAU = 0.08  # softness of compartment boundaries, in normalised-radius units


@dataclass
class Blob:
    centre: np.ndarray  # voxel coordinates on the output grid
    semi_mm: np.ndarray  # three semi-axes, mm
    rot: np.ndarray  # 3x3 rotation (columns = blob axes)


@dataclass
class Lesion:
    """One lesion of a case; fields are documented in the module docstring."""

    blobs: list[Blob]
    rough: float  # amplitude of the smooth shape noise (normalised radius units)
    lobe_mm: float  # length scale of that noise
    ncr: float = 0.0  # necrosis threshold on the core field (0: none)
    ed: float = 1.0  # oedema extent, multiple of the core radius (1: none)
    mass: float = 0.3  # mass-effect strength
    cyst: Blob | None = None
    et_threshold: float | None = None  # PED patchy enhancement: ET where noise > threshold
    extra_axial: bool = False  # MEN: may extend outside the brain
    dura: tuple[np.ndarray, np.ndarray] | None = None  # MEN: (point on the dura, outward unit normal)

    @property
    def radius_mm(self) -> float:
        return float(max(b.semi_mm.max() for b in self.blobs))


@dataclass
class TumourFields:
    core: np.ndarray
    ncr: np.ndarray
    ed: np.ndarray
    cyst: np.ndarray
    patch: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)


# --------------------------------------------------------------------------- sampling helpers
def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return _rotation(rng.uniform(-np.pi, np.pi, 3))


def _blob(rng, centre, radius_mm, aniso=0.25, rot=None) -> Blob:
    semi = radius_mm * rng.uniform(1 - aniso, 1 + aniso, 3)
    semi *= radius_mm / np.prod(semi) ** (1 / 3)  # keep the equivalent-sphere radius
    return Blob(np.asarray(centre, float), semi, _random_rotation(rng) if rot is None else rot)


def _with_satellites(rng, grid: Grid, centre, radius_mm, count) -> list[Blob]:
    """Main blob plus `count` overlapping satellites: lobulated, irregular masses."""
    sp = np.asarray(grid.spacing)
    blobs = [_blob(rng, centre, radius_mm)]
    for _ in range(count):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        offset = direction * radius_mm * rng.uniform(0.45, 0.85) / sp
        blobs.append(_blob(rng, np.asarray(centre) + offset, radius_mm * rng.uniform(0.35, 0.65)))
    return blobs


def _pick(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray | None:
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return None
    voxel = np.array(np.unravel_index(idx[rng.integers(idx.size)], candidates.shape), float)
    return voxel + rng.uniform(-0.5, 0.5, 3)


def _deep_centre(rng, template: Template, min_depth_mm: float, extra=None) -> np.ndarray:
    """Random brain voxel at least `min_depth_mm` from the surface, outside the CSF."""
    not_csf = template.t1 > (template.means[0] + template.means[1]) / 2
    attempts = [(min_depth_mm, True), (0.5 * min_depth_mm, True), (0.5 * min_depth_mm, False), (0.0, False)]
    for depth, use_extra in attempts:
        cand = (template.depth_mm >= depth) & not_csf
        if use_extra and extra is not None:
            cand &= extra
        choice = _pick(rng, cand)
        if choice is not None:
            return choice
    return np.asarray(template.mask.shape, float) / 2


def _rim_ncr(rng, radius_mm: float, lo: float, hi: float) -> float:
    """Necrosis threshold giving an enhancing rim `lo`..`hi` mm thick."""
    return float(np.clip(1 - rng.uniform(lo, hi) / radius_mm, 0.2, 0.85))


# --------------------------------------------------------------------------- per challenge
def _glioma(rng, grid, template, *, big=(12.0, 28.0)) -> list[Lesion]:
    lesions = []
    count = int(rng.choice([1, 2, 3], p=[0.8, 0.15, 0.05]))
    for i in range(count):
        radius = rng.uniform(*big) if i == 0 else rng.uniform(6.0, 13.0)
        centre = _deep_centre(rng, template, 0.7 * radius)
        kind = rng.uniform()
        ncr = _rim_ncr(rng, radius, 2.5, 7.0) if kind < 0.8 else (0.0 if kind < 0.9 else 1.3)
        lesions.append(
            Lesion(
                blobs=_with_satellites(rng, grid, centre, radius, int(rng.integers(1, 4))),
                rough=rng.uniform(0.15, 0.3),
                lobe_mm=radius * rng.uniform(0.4, 0.8),
                ncr=ncr,
                ed=rng.uniform(1.4, 2.2),
                mass=rng.uniform(0.25, 0.5),
            )
        )
    return lesions


def _meningioma(rng, grid, template) -> list[Lesion]:
    sp = np.asarray(grid.spacing)
    lesions = []
    surface = template.mask & (template.depth_mm <= 1.01 * sp.max())
    z_lo = np.flatnonzero(template.mask.any(axis=(0, 1)))
    zs = np.arange(grid.shape[2])
    upper = (zs > z_lo.min() + 0.35 * (z_lo.max() - z_lo.min()))[None, None, :]  # convexity, not skull base
    # outward normal = -grad(depth)
    grad = np.stack(np.gradient(template.depth_mm, *sp))
    for _ in range(int(rng.choice([1, 2], p=[0.85, 0.15]))):
        point = _pick(rng, surface & upper)
        if point is None:
            point = _pick(rng, surface)
        ijk = tuple(np.clip(np.round(point).astype(int), 0, np.asarray(grid.shape) - 1))
        normal = -grad[(slice(None),) + ijk]
        normal = normal / (np.linalg.norm(normal) + 1e-6)
        radius = rng.uniform(8.0, 22.0)
        # dural base slightly outside the brain surface; the mass grows inward, flat against the dura
        dura = point + normal * rng.uniform(0.0, 3.0) / sp
        centre = dura - normal * radius * rng.uniform(0.35, 0.6) / sp
        helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        u = np.cross(normal, helper)
        u /= np.linalg.norm(u)
        rot = np.stack([normal, u, np.cross(normal, u)], axis=1)
        main = Blob(centre, radius * np.array([0.9, 1.1, 1.15]) * rng.uniform(0.9, 1.1, 3), rot)
        blobs = [main]
        if rng.uniform() < 0.5:
            off = rot[:, 1] * rng.choice([-1, 1]) * radius * 0.6 / sp
            blobs.append(_blob(rng, centre + off, radius * rng.uniform(0.4, 0.6), rot=rot))
        lesions.append(
            Lesion(
                blobs=blobs,
                rough=rng.uniform(0.06, 0.14),
                lobe_mm=radius * 0.6,
                ncr=rng.uniform(0.15, 0.35) if rng.uniform() < 0.2 else 0.0,
                ed=rng.uniform(1.15, 1.5) if rng.uniform() < 0.6 else 1.0,
                mass=rng.uniform(0.45, 0.7),
                extra_axial=True,
                dura=(dura, normal),
            )
        )
    return lesions


def _metastases(rng, grid, template) -> list[Lesion]:
    sp = np.asarray(grid.spacing)
    m = template.means
    junction = np.abs(template.t1 - (m[1] + m[2]) / 2) < (m[2] - m[1]) * 0.35  # grey-white junction
    count = int(rng.integers(2, 7))
    # the first is tiny (a few voxels at any grid), the rest log-uniform 2.5..12 mm
    radii = [max(rng.uniform(1.6, 3.0), 1.2 * sp.max())] + list(np.exp(rng.uniform(np.log(2.5), np.log(12), count - 1)))
    lesions: list[Lesion] = []
    for radius in radii:
        for _attempt in range(20):
            centre = _deep_centre(rng, template, radius + 2.0, extra=junction)
            far = all(
                np.linalg.norm((centre - o.blobs[0].centre) * sp) > (radius + o.radius_mm) * 1.6 + 4 for o in lesions
            )
            if far:
                break
        big = radius > 4.5
        lesions.append(
            Lesion(
                blobs=_with_satellites(rng, grid, centre, radius, int(big and rng.uniform() < 0.5)),
                rough=rng.uniform(0.1, 0.2),
                lobe_mm=max(radius * 0.6, 2 * sp.min()),
                ncr=_rim_ncr(rng, radius, 1.5, 3.0) if big else 0.0,
                ed=rng.uniform(1.8, 3.2) if big else rng.uniform(1.0, 1.6),
                mass=rng.uniform(0.15, 0.35),
            )
        )
    return lesions


def _paediatric(rng, grid, template) -> list[Lesion]:
    sp = np.asarray(grid.spacing)
    radius = rng.uniform(12.0, 25.0)
    extra = None
    if rng.uniform() < 0.5:  # posterior fossa / brainstem: inferior third of the brain
        zs = np.flatnonzero(template.mask.any(axis=(0, 1)))
        extra = (np.arange(grid.shape[2]) < zs.min() + 0.38 * (zs.max() - zs.min()))[None, None, :]
    centre = _deep_centre(rng, template, 0.6 * radius, extra=extra)
    cyst = None
    if rng.uniform() < 0.6:
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        offset = direction * radius * rng.uniform(0.3, 0.6) / sp
        cyst = _blob(rng, centre + offset, radius * rng.uniform(0.3, 0.5), 0.12)
    return [
        Lesion(
            blobs=_with_satellites(rng, grid, centre, radius, int(rng.integers(0, 3))),
            rough=rng.uniform(0.15, 0.25),
            lobe_mm=radius * rng.uniform(0.4, 0.8),
            ed=rng.uniform(1.1, 1.5) if rng.uniform() < 0.7 else 1.0,
            mass=rng.uniform(0.25, 0.5),
            cyst=cyst,
            et_threshold=rng.uniform(0.4, 1.5) if rng.uniform() < 0.75 else None,
        )
    ]


SAMPLERS = {
    "GLI": _glioma,
    "SSA": lambda rng, grid, tpl: _glioma(rng, grid, tpl, big=(15.0, 30.0)),  # presents later, larger
    "MEN": _meningioma,
    "MET": _metastases,
    "PED": _paediatric,
}


def sample_lesions(challenge: str, rng: np.random.Generator, grid: Grid, template: Template) -> list[Lesion]:
    """Lesions of one case for `challenge` (centres on the unwarped template)."""
    return SAMPLERS[challenge](rng, grid, template)


def relocate(lesions: list[Lesion], to_output) -> list[Lesion]:
    """Carry lesion centres from template to output coordinates (`to_output`: (N, 3) -> (N, 3))."""
    for les in lesions:
        blobs = les.blobs + ([les.cyst] if les.cyst is not None else [])
        points = [b.centre for b in blobs] + ([les.dura[0]] if les.dura is not None else [])
        moved = to_output(np.array(points))
        for b, c in zip(blobs, moved):
            b.centre = c
        if les.dura is not None:
            les.dura = (moved[-1], les.dura[1])
    return lesions


def mass_effects(lesions: list[Lesion]) -> list[MassEffect]:
    """Radial push around each lesion's main blob (MEN: away from the dural base, i.e. inward)."""
    return [
        MassEffect(les.dura[0] if les.dura is not None else les.blobs[0].centre, 1.2 * les.radius_mm, les.mass)
        for les in lesions
    ]


# --------------------------------------------------------------------------- rasterising
def _ellipsoid_radius(blob: Blob, axes_mm: list[np.ndarray], origin: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius of `blob` on a box whose voxel 0 is `origin`."""
    d = [(ax + (origin[i] - blob.centre[i]) * sp[i]).astype(np.float32) for i, ax in enumerate(axes_mm)]
    dx, dy, dz = np.ix_(*d)
    r2 = 0.0
    for k in range(3):
        a = blob.rot[:, k]
        r2 = r2 + ((a[0] * dx + a[1] * dy + a[2] * dz) / blob.semi_mm[k]) ** 2
    return np.sqrt(r2).astype(np.float32)


def rasterise(lesions: list[Lesion], grid: Grid, rng: np.random.Generator) -> TumourFields:
    """Write every lesion's fields (see module docstring) into full-grid arrays."""
    shape = grid.shape
    sp = np.asarray(grid.spacing)
    f = TumourFields(*(np.full(shape, BIG, np.float32) for _ in range(4)), np.full(shape, -BIG, np.float32), lesions)
    for les in lesions:
        reach = les.radius_mm * (les.ed + 0.6) * (1 + les.rough) + 2 * sp.max()
        centres = np.array([b.centre for b in les.blobs] + ([les.cyst.centre] if les.cyst else []))
        lo = np.maximum(np.floor(centres.min(0) - reach / sp), 0).astype(int)
        hi = np.minimum(np.ceil(centres.max(0) + reach / sp) + 1, shape).astype(int)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        bshape = tuple(int(b - a) for a, b in zip(lo, hi))
        axes_mm = [np.arange(n) * s for n, s in zip(bshape, sp)]
        r = np.min([_ellipsoid_radius(b, axes_mm, lo, sp) for b in les.blobs], axis=0)
        shape_n, inner_n, patch_n = smooth_field(rng, bshape, les.lobe_mm / sp, 3)
        ed_n = smooth_field(rng, bshape, 1.5 * les.lobe_mm / sp, 1)[0]
        core = r + les.rough * shape_n
        if les.dura is not None:  # flat against the dura: nothing beyond the dural plane
            point, normal = les.dura
            beyond = sum(
                (axes_mm[i] + (lo[i] - point[i]) * sp[i]).reshape([-1 if j == i else 1 for j in range(3)]) * normal[i]
                for i in range(3)
            )
            core = np.maximum(core, 1.0 + beyond / (0.3 * les.radius_mm))
        f.core[box] = np.minimum(f.core[box], core)
        if les.ncr > 0:
            f.ncr[box] = np.minimum(f.ncr[box], (core + 0.15 * inner_n) / les.ncr)
        if les.ed > 1:
            f.ed[box] = np.minimum(f.ed[box], core / les.ed + 0.12 * ed_n)
        if les.cyst is not None:
            cyst = _ellipsoid_radius(les.cyst, axes_mm, lo, sp) + 0.05 * inner_n
            f.cyst[box] = np.minimum(f.cyst[box], cyst)
        if les.et_threshold is not None:
            f.patch[box] = np.maximum(f.patch[box], patch_n - les.et_threshold)
    return f


def soft(field_: np.ndarray) -> np.ndarray:
    """Soft membership of `field_ < 1` (0.5 exactly on the boundary)."""
    return (0.5 - 0.5 * np.tanh((field_ - 1.0) / TAU)).astype(np.float32)
