"""Time ``bratstune.metrics.lesion_wise`` against the official ``brats-evaluation`` on the same cases.

Usage::

    python benchmarks/metrics_speed.py [--cases 6] [--repeats 3] [--challenge GLI] [--seed 0] [--no-reference]

Cases are full-size (240×240×155, 1 mm) label volumes with real lesion shapes (:func:`make_case`):
several lobulated lesions per case (a large tumour with necrosis, enhancing rim and oedema, smaller
satellites, metastasis-like specks), and a prediction that gets them partly wrong the way a network
does: boundaries off by a voxel or two, a missed small lesion, false-positive lesions, label
confusion in the core, and dust (1–20-voxel components, near the tumour and anywhere in the brain).

The reference runs ``Panoptica_Evaluator.evaluate`` with brats-evaluation's bundled config in
``.venv-ref`` (``make ref-venv``), in one persistent subprocess (``tests/metrics/_reference_driver.py
--serve``) that times ``evaluate`` alone. Both sides are warmed alike on a separate case (imports,
tables, the evaluator's config) and run on one thread. Timings are interleaved case by case
(ours brats2026, the reference, ours brats2023), ``--repeats`` times, so that both sides see the same
machine load; each case reports medians, and the summary the median per-case ratio and the ratio of
total times, with the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "metrics" / "_reference_driver.py"
CONFIGS = {"GLI": "gli", "MET": "mets", "PED": "ped", "SSA": "GoAT", "MEN": "MenPre"}
SHAPE = (240, 240, 155)
TARGET = 20.0  # brats2026 speed-up over brats-evaluation asked of this benchmark (issue 12)


# -- cases ----------------------------------------------------------------------------------------------


def _field(rng: np.random.Generator, radius: float, rough: float) -> tuple[np.ndarray, int]:
    """A lobulated blob's normalised radius field on its own cube: ``≤ 1`` inside, smooth bumps."""
    half = int(np.ceil(radius * 1.6)) + 2
    axes = [np.arange(-half, half + 1, dtype=np.float32) for _ in range(3)]
    stretch = rng.uniform(0.75, 1.3, size=3)
    grid = np.meshgrid(*axes, indexing="ij", sparse=True)
    dist = np.sqrt(sum((g / (radius * s)) ** 2 for g, s in zip(grid, stretch)))
    bumps = ndimage.zoom(rng.normal(0.0, rough, (5, 5, 5)).astype(np.float32), (2 * half + 1) / 5, order=1)
    return dist + bumps[: 2 * half + 1, : 2 * half + 1, : 2 * half + 1], half


def _paint(seg: np.ndarray, rng, centre, radius: float, kind: str, rough: float = 0.12) -> None:
    """Paint one lesion into ``seg``: ``kind`` "glioma" (ED, ET rim, NCR) or "small" (ET, some ED)."""
    dist, half = _field(rng, radius, rough)
    lo = [int(c) - half for c in centre]
    box = tuple(slice(max(a, 0), min(a + 2 * half + 1, n)) for a, n in zip(lo, seg.shape))
    local = tuple(slice(b.start - a, b.stop - a) for a, b in zip(lo, box))
    d = dist[local]
    view = seg[box]
    if kind == "glioma":
        view[(d <= 1.0) & (view == 0)] = 2
        view[d <= 0.6] = 3
        view[d <= rng.uniform(0.3, 0.45)] = 1
    else:
        if rng.random() < 0.5:
            view[(d <= 1.6) & (view == 0)] = 2
        view[d <= 1.0] = 3


def make_case(rng: np.random.Generator, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A full-size (pred, gt) label pair in the BraTS 2023 scheme (1 NCR, 2 ED, 3 ET)."""
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    brain_lo = np.array([45, 40, 25])
    brain_hi = np.array(shape) - np.array([45, 40, 25])
    lesions = [("glioma", rng.uniform(14, 28))]
    lesions += [("glioma", rng.uniform(6, 12)) for _ in range(int(rng.integers(0, 3)))]
    lesions += [("small", rng.uniform(1.5, 5)) for _ in range(int(rng.integers(1, 6)))]
    tumour_centres = []
    for index, (kind, radius) in enumerate(lesions):
        centre = rng.uniform(brain_lo, brain_hi)
        if index and kind == "glioma" and rng.random() < 0.5:  # a satellite near the main tumour
            centre = np.clip(tumour_centres[0] + rng.normal(0, radius + 10, 3), brain_lo, brain_hi)
        tumour_centres.append(centre)
        seed = int(rng.integers(2**31))
        _paint(gt, np.random.default_rng(seed), centre, radius, kind)
        if kind == "small" and rng.random() < 0.25:
            continue  # a missed small lesion
        # the prediction: same lesion, shifted a little, its size and boundary off
        shifted = centre + rng.integers(-2, 3, 3)
        _paint(pred, np.random.default_rng(seed + 1), shifted, radius * rng.uniform(0.85, 1.15), kind, rough=0.16)
    for _ in range(int(rng.integers(0, 4))):  # false-positive lesions
        _paint(pred, rng, rng.uniform(brain_lo, brain_hi), rng.uniform(1.5, 6), "small")
    core = np.isin(pred, (1, 3))  # label confusion inside the predicted core
    flip = core & (ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2) > 0.35)
    pred[flip] = np.where(pred[flip] == 1, 3, 1)
    for _ in range(int(rng.integers(10, 60))):  # dust: near the tumours, or anywhere in the brain
        near = rng.random() < 0.5
        base = tumour_centres[int(rng.integers(len(tumour_centres)))] if near else rng.uniform(brain_lo, brain_hi)
        c = np.clip(base + (rng.normal(0, 20, 3) if near else 0), 2, np.array(shape) - 6).astype(int)
        size = rng.integers(1, 4, 3)
        pred[c[0] : c[0] + size[0], c[1] : c[1] + size[1], c[2] : c[2] + size[2]] = int(rng.integers(1, 4))
    return pred, gt


# -- timing -------------------------------------------------------------------------------------------


class Reference:
    """brats-evaluation in ``.venv-ref``, one persistent process, one case at a time."""

    def __init__(self, challenge: str, workdir: Path) -> None:
        python = REPO / ".venv-ref" / "bin" / "python"
        if not python.exists():
            raise FileNotFoundError("reference venv .venv-ref missing (make ref-venv): reference not timed")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        self.config = CONFIGS[challenge]
        self.workdir = workdir
        self.process = subprocess.Popen(
            [str(python), str(DRIVER), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def save(self, name: str, pred: np.ndarray, gt: np.ndarray) -> dict:
        np.save(self.workdir / f"{name}_pred.npy", pred)
        np.save(self.workdir / f"{name}_gt.npy", gt)
        return {
            "id": name,
            "kind": "brats2026",
            "config": self.config,
            "pred": str(self.workdir / f"{name}_pred.npy"),
            "gt": str(self.workdir / f"{name}_gt.npy"),
            "spacing": [1.0, 1.0, 1.0],
        }

    def seconds(self, case: dict) -> float:
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        while True:  # the package prints progress lines of its own
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the reference process ended (exit code {self.process.poll()})")
            if line.startswith("@result "):
                return float(json.loads(line[len("@result ") :])["seconds"])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--challenge", default="GLI", choices=sorted(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args(argv)

    from bratstune.metrics import lesion_wise

    rng = np.random.default_rng(args.seed)
    warm = make_case(np.random.default_rng(args.seed + 10_000))
    cases = [make_case(rng) for _ in range(args.cases)]
    load_before = os.getloadavg()[0]
    ours26: list[list[float]] = [[] for _ in cases]
    ours23: list[list[float]] = [[] for _ in cases]
    ref: list[list[float]] = [[] for _ in cases]
    with tempfile.TemporaryDirectory() as tmp:
        reference = None if args.no_reference else Reference(args.challenge, Path(tmp))
        try:
            jobs = [reference.save(str(i), p, g) for i, (p, g) in enumerate(cases)] if reference else []
            # warm-up, alike: one untimed evaluation on each side (imports, tables, the evaluator)
            for protocol in ("brats2026", "brats2023"):
                lesion_wise(warm[0], warm[1], args.challenge, protocol)
            if reference:
                reference.seconds(reference.save("warm", *warm))
            for _ in range(args.repeats):
                for i, (pred, gt) in enumerate(cases):
                    ours26[i].append(_time(lambda: lesion_wise(pred, gt, args.challenge, "brats2026")))  # noqa: B023
                    if reference:
                        ref[i].append(reference.seconds(jobs[i]))
                    ours23[i].append(_time(lambda: lesion_wise(pred, gt, args.challenge, "brats2023")))  # noqa: B023
        finally:
            if reference:
                reference.close()
    load_after = os.getloadavg()[0]

    med = statistics.median
    print(
        f"challenge {args.challenge}, {args.cases} cases of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} (1 mm), one thread, "
        f"medians of {args.repeats} interleaved runs; load average {load_before:.2f} -> {load_after:.2f}"
    )
    print(
        f"{'case':>4} {'brats2026 ours':>15} {'brats-evaluation':>17} {'speed-up':>9} {'brats2023 ours':>15} {'lesions':>8}"
    )
    for i, (_, gt) in enumerate(cases):
        lesions = int(ndimage.label(gt > 0, structure=np.ones((3, 3, 3)))[1])
        r = f"{med(ref[i]):16.3f}s {med(ref[i]) / med(ours26[i]):8.1f}x" if ref[i] else f"{'':>27}"
        print(f"{i:>4} {med(ours26[i]):14.3f}s {r} {med(ours23[i]):14.3f}s {lesions:>8}")
    total26 = sum(med(t) for t in ours26)
    total23 = sum(med(t) for t in ours23)
    if not args.no_reference:
        total_ref = sum(med(t) for t in ref)
        ratios26 = [med(r) / med(o) for r, o in zip(ref, ours26)]
        ratios23 = [med(r) / med(o) for r, o in zip(ref, ours23)]
        print(
            f"brats2026: median per-case speed-up {med(ratios26):.1f}x, total {total_ref / total26:.1f}x "
            f"(target {TARGET:.0f}x: {'met' if min(med(ratios26), total_ref / total26) >= TARGET else 'NOT met'})"
        )
        print(
            f"brats2023 (other rules, same cases) vs brats-evaluation: median {med(ratios23):.1f}x, "
            f"total {total_ref / total23:.1f}x"
        )
    else:
        print(f"total ours: brats2026 {total26:.3f}s, brats2023 {total23:.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
