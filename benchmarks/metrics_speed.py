"""Time ``bratstune.metrics.lesion_wise`` against the official ``brats-evaluation`` on the same cases.

Usage::

    python benchmarks/metrics_speed.py [--cases 5] [--challenge GLI] [--no-reference]

Cases are full-size (240×240×155) synthetic label volumes: a few irregular tumours (oedema, core,
enhancing rim) and a prediction made from them by shifting, growing/shrinking parts, missing a
lesion and adding dust. Our side runs in this process on one thread (after one warm-up call, which
also pays MONAI's import for the surfel table); the reference runs ``Panoptica_Evaluator.evaluate``
with brats-evaluation's bundled config in ``.venv-ref`` (``make ref-venv``), one subprocess for all
cases, timing each ``evaluate`` call inside it. Prints one line per case and the per-case ratio.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
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


def make_case(rng: np.random.Generator, shape=(240, 240, 155)) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic (pred, gt) label pair in the BraTS 2023 scheme (1 NCR, 2 ED, 3 ET)."""
    gt = np.zeros(shape, np.uint8)
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(int(rng.integers(1, 4))):
        centre = [rng.uniform(70, n - 70) if n > 150 else rng.uniform(45, n - 45) for n in shape]
        radius = rng.uniform(8, 30)
        # bumpy ellipsoid: radius modulated by a low-frequency random field
        dist = np.sqrt(sum(((g - c) / (radius * rng.uniform(0.7, 1.3))) ** 2 for g, c in zip(grids, centre)))
        bumps = ndimage.zoom(rng.normal(0, 0.12, (6, 6, 5)), [n / m for n, m in zip(shape, (6, 6, 5))], order=1)
        dist = dist + bumps[: shape[0], : shape[1], : shape[2]]
        gt[(dist <= 1.0) & (gt == 0)] = 2
        gt[dist <= 0.55] = 3
        gt[dist <= 0.4] = 1
    pred = np.roll(gt, tuple(int(s) for s in rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
    et = pred == 3
    pred[ndimage.binary_dilation(et, iterations=1) & (pred == 2)] = 3
    for _ in range(int(rng.integers(5, 40))):  # dust
        c = tuple(int(rng.integers(20, n - 20)) for n in shape)
        pred[c[0] : c[0] + int(rng.integers(1, 4)), c[1] : c[1] + 2, c[2] : c[2] + 2] = int(rng.integers(1, 4))
    return pred, gt


def time_ours(cases, challenge: str, protocol: str) -> list[float]:
    from bratstune.metrics import lesion_wise

    lesion_wise(cases[0][0], cases[0][1], challenge, protocol)  # warm-up (imports, tables)
    seconds = []
    for pred, gt in cases:
        start = time.perf_counter()
        lesion_wise(pred, gt, challenge, protocol)
        seconds.append(time.perf_counter() - start)
    return seconds


def time_reference(cases, challenge: str) -> list[float] | None:
    python = REPO / ".venv-ref" / "bin" / "python"
    if not python.exists():
        print("reference venv .venv-ref missing (make ref-venv): reference not timed", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        job = []
        for i, (pred, gt) in enumerate(cases):
            np.save(f"{tmp}/{i}_pred.npy", pred)
            np.save(f"{tmp}/{i}_gt.npy", gt)
            job.append(
                {
                    "id": str(i),
                    "kind": "brats2026",
                    "config": CONFIGS[challenge],
                    "pred": f"{tmp}/{i}_pred.npy",
                    "gt": f"{tmp}/{i}_gt.npy",
                    "spacing": [1.0, 1.0, 1.0],
                }
            )
        Path(f"{tmp}/job.json").write_text(json.dumps({"cases": job}))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        subprocess.run(
            [str(python), str(DRIVER), f"{tmp}/job.json", f"{tmp}/out.json"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        out = json.loads(Path(f"{tmp}/out.json").read_text())
    return [float(out[str(i)]["__seconds__"]) for i in range(len(cases))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--challenge", default="GLI", choices=sorted(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    cases = [make_case(rng) for _ in range(args.cases)]
    ours26 = time_ours(cases, args.challenge, "brats2026")
    ours23 = time_ours(cases, args.challenge, "brats2023")
    ref = None if args.no_reference else time_reference(cases, args.challenge)

    print(f"challenge {args.challenge}, {args.cases} cases of 240x240x155, one thread")
    print(f"{'case':>4} {'brats2026 ours':>15} {'brats-evaluation':>17} {'speed-up':>9} {'brats2023 ours':>15}")
    for i in range(args.cases):
        r = "" if ref is None else f"{ref[i]:16.3f}s {ref[i] / ours26[i]:8.1f}x"
        print(f"{i:>4} {ours26[i]:14.3f}s {r:>27} {ours23[i]:14.3f}s")
    print(
        f"mean {np.mean(ours26):14.3f}s "
        + ("" if ref is None else f"{np.mean(ref):16.3f}s {np.mean(ref) / np.mean(ours26):8.1f}x")
        + f" {np.mean(ours23):14.3f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
