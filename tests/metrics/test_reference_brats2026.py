"""Differential test: protocol ``brats2026`` against the official ``brats-evaluation`` 0.0.10.

Hundreds of random cases (lesions of all sizes, touching and nearby lesions, empty GT, empty
prediction, both empty, 1-voxel false positives, anisotropic spacing) are evaluated by this
implementation and, in ONE subprocess, by the reference package in ``.venv-ref``; every reported
value must agree (Dice-like values within 1e-6, distances within 1e-3 mm, counts exactly).

The package is given numpy arrays and ``voxelspacing`` (its NIfTI path goes through SimpleITK,
which hands it (z, y, x) arrays with (x, y, z) spacing, so anisotropic files are not trustworthy
there). Its whole-region HD95 ignores the spacing, so ``legacy_hd95`` is compared at 1 mm only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bratstune.metrics import lesion_wise

pytestmark = pytest.mark.reference

CONFIG = {"GLI": "gli", "PED": "ped", "MET": "mets", "GOAT": "GoAT", "MEN": "MenPre"}
LABELS = {"GLI": (1, 2, 3, 4), "PED": (1, 2, 3, 4), "MET": (1, 2, 3, 4), "GOAT": (1, 2, 3), "MEN": (1, 2, 3)}
N_SMALL = 240
SHAPE = (48, 48, 40)


# ------------------------------------------------------------------------------------------------
# random cases
# ------------------------------------------------------------------------------------------------
def _ellipsoid(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    d = sum(((g - c) / max(r, 0.5)) ** 2 for g, c, r in zip(grids, centre, radii))
    return d <= 1.0


def _random_gt(rng, shape, labels):
    seg = np.zeros(shape, np.uint8)
    n_tumours = int(rng.integers(0, 4))
    for _ in range(n_tumours):
        centre = [rng.uniform(4, n - 4) for n in shape]
        r = rng.uniform(1.0, 9.0)
        radii = [r * rng.uniform(0.6, 1.4) for _ in range(3)]
        outer = _ellipsoid(shape, centre, radii)
        seg[outer & (seg == 0)] = labels[1] if len(labels) > 1 else labels[0]
        core = _ellipsoid(shape, centre, [x * rng.uniform(0.3, 0.8) for x in radii])
        seg[core] = labels[0]
        for _ in range(int(rng.integers(0, 4))):  # enhancing blobs, some inside, some touching the rim
            c2 = [c + rng.uniform(-1, 1) * x for c, x in zip(centre, radii)]
            seg[_ellipsoid(shape, c2, [rng.uniform(0.5, 3.0) for _ in range(3)])] = labels[2 % len(labels)]
    if len(labels) > 3 and rng.random() < 0.3:  # a resection cavity / oedema-like extra label
        c = [rng.uniform(3, n - 3) for n in shape]
        seg[_ellipsoid(shape, c, [rng.uniform(0.5, 4) for _ in range(3)])] = labels[3]
    if rng.random() < 0.3:  # two nearby or touching small lesions
        c = np.array([rng.uniform(6, n - 6) for n in shape])
        gap = int(rng.integers(0, 4))
        r = rng.uniform(1, 3)
        lab = labels[int(rng.integers(0, len(labels)))]
        seg[_ellipsoid(shape, c, [r] * 3)] = lab
        seg[_ellipsoid(shape, c + [2 * r + gap, 0, 0], [r] * 3)] = lab
    return seg


def _perturb(rng, gt, labels):
    pred = gt.copy()
    kind = rng.integers(0, 6)
    if kind == 0:  # shift
        shift = rng.integers(-2, 3, size=3)
        pred = np.roll(pred, tuple(int(s) for s in shift), axis=(0, 1, 2))
    elif kind == 1:  # relabel a random fraction of the foreground
        fg = np.flatnonzero(pred)
        if fg.size:
            pick = rng.choice(fg, size=max(1, fg.size // 10), replace=False)
            pred.ravel()[pick] = rng.choice(labels, size=pick.size)
    elif kind == 2:  # drop a whole label
        pred[pred == labels[int(rng.integers(0, len(labels)))]] = 0
    elif kind == 3:  # grow one label by a voxel
        from scipy import ndimage

        lab = labels[int(rng.integers(0, len(labels)))]
        grown = ndimage.binary_dilation(pred == lab) & (pred == 0)
        pred[grown] = lab
    elif kind == 4:  # an unrelated random prediction
        pred = _random_gt(rng, gt.shape, labels)
    for _ in range(int(rng.integers(0, 5))):  # 1-voxel false positives
        idx = tuple(int(rng.integers(0, n)) for n in gt.shape)
        pred[idx] = labels[int(rng.integers(0, len(labels)))]
    return pred


def _cases():
    rng = np.random.default_rng(20260)
    challenges = list(CONFIG)
    cases = []
    for i in range(N_SMALL):
        challenge = challenges[i % len(challenges)]
        labels = LABELS[challenge]
        gt = _random_gt(rng, SHAPE, labels)
        pred = _perturb(rng, gt, labels)
        special = i % 40
        if special == 1:
            gt[:] = 0
        elif special == 2:
            pred[:] = 0
        elif special == 3:
            gt[:] = 0
            pred[:] = 0
        elif special == 4:
            pred = gt.copy()
        elif special == 5:  # single voxels only
            gt[:] = 0
            pred[:] = 0
            for _ in range(4):
                gt[tuple(int(rng.integers(0, n)) for n in SHAPE)] = labels[0]
                pred[tuple(int(rng.integers(0, n)) for n in SHAPE)] = labels[0]
        spacing = (1.0, 1.0, 1.0)
        if rng.random() < 0.25:
            spacing = tuple(float(x) for x in rng.choice([0.5, 0.8, 1.0, 1.2, 2.0, 3.0], size=3))
        cases.append({"id": f"s{i:03d}", "challenge": challenge, "gt": gt, "pred": pred, "spacing": spacing})
    return cases


def _full_size_cases():
    rng = np.random.default_rng(7)
    cases = []
    for i, challenge in enumerate(("GLI", "MET", "PED")):
        labels = LABELS[challenge]
        gt = np.zeros((240, 240, 155), np.uint8)
        for _ in range(2 + i):
            c = [rng.uniform(60, 180), rng.uniform(60, 180), rng.uniform(40, 110)]
            r = rng.uniform(6, 28)
            gt[_ellipsoid(gt.shape, c, [r, r * 0.8, r * 0.9])] = labels[1]
            gt[_ellipsoid(gt.shape, c, [r * 0.5, r * 0.4, r * 0.5])] = labels[0]
            gt[_ellipsoid(gt.shape, [c[0] + r * 0.4, c[1], c[2]], [r * 0.3] * 3)] = labels[2]
        pred = np.roll(gt, (1, -1, 0), axis=(0, 1, 2))
        for _ in range(10):
            pred[tuple(int(rng.integers(0, n)) for n in gt.shape)] = labels[2]
        cases.append({"id": f"full{i}", "challenge": challenge, "gt": gt, "pred": pred, "spacing": (1.0, 1.0, 1.0)})
    return cases


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------
def _num(value):
    return float("nan") if value is None else float(value)


def _close(ours, theirs, tol, what):
    ours, theirs = _num(ours), _num(theirs)
    if math.isnan(theirs) or math.isnan(ours):
        assert math.isnan(theirs) and math.isnan(ours), f"{what}: ours {ours} vs reference {theirs}"
        return 0.0
    if math.isinf(theirs) or math.isinf(ours):
        assert ours == theirs, f"{what}: ours {ours} vs reference {theirs}"
        return 0.0
    diff = abs(ours - theirs)
    assert diff <= tol, f"{what}: ours {ours} vs reference {theirs} (diff {diff})"
    return diff


def _compare(case, ours, ref, stats):
    cid = case["id"]
    assert {k.upper() for k in ref if not k.startswith("__")} == set(ours), cid
    for group, r in ref.items():
        if group.startswith("__"):
            continue
        o = ours[group.upper()]
        where = f"{cid} {case['challenge']} {group} spacing={case['spacing']}"
        for ref_key, our_key in (("tp", "num_tp"), ("fp", "num_fp"), ("fn", "num_fn")):
            assert o[our_key] == r[ref_key], f"{where} {our_key}: {o[our_key]} vs {r[ref_key]}"
        for ref_key, our_key in (
            ("prec", "precision"),
            ("rec", "recall"),
            ("rq", "f1"),
            ("sq_dsc", "lesionwise_dice"),
            ("sq_dsc_std", "lesionwise_dice_std"),
            ("sq_nsd", "lesionwise_nsd"),
            ("global_bin_dsc", "legacy_dice"),
        ):
            stats["dice"] = max(stats["dice"], _close(o[our_key], r.get(ref_key), 1e-6, f"{where} {our_key}"))
        for ref_key, our_key in (("sq_hd95", "lesionwise_hd95"), ("sq_hd95_std", "lesionwise_hd95_std")):
            stats["hd95"] = max(stats["hd95"], _close(o[our_key], r.get(ref_key), 1e-3, f"{where} {our_key}"))
        if case["spacing"] == (1.0, 1.0, 1.0):
            g = r.get("global_bin_hd95")
            g = 373.0 if g is not None and math.isinf(g) else g
            stats["hd95"] = max(stats["hd95"], _close(o["legacy_hd95"], g, 1e-3, f"{where} legacy_hd95"))
        # per-instance table: same multiset of (matched, voxels, dice, hd95)
        ours_rows = sorted(
            (int(x["matched"]), x["voxels"], round(x["dice"] or 0.0, 9), round(x["hd95"] or 0.0, 6))
            for x in o["lesions"]
        )
        ref_rows = sorted(
            (x["is_matched"], x["voxel_count"], round(x.get("sq_dsc", 0.0), 9), round(x.get("sq_hd95", 0.0), 6))
            for x in r.get("reference_instances", [])
        )
        assert ours_rows == ref_rows, f"{where} per-lesion table differs"
        mets = ref.get("__mets__")
        if mets is not None:
            _close(o["met_dice"], mets.get(f"lesionwise_dsc_mean_{group}"), 1e-6, f"{where} penalised dice")
            _close(o["met_hd95"], mets.get(f"lesionwise_hd95_mean_{group}"), 1e-3, f"{where} penalised hd95")
    stats["cases"] += 1


def _evaluate_ours(case):
    out = lesion_wise(case["pred"], case["gt"], case["challenge"], "brats2026", case["spacing"], lesions=True)
    penal = lesion_wise(case["pred"], case["gt"], case["challenge"], "brats2026", case["spacing"], penalised=True)
    for region, values in penal.items():
        out[region]["met_dice"] = values["lesionwise_dice"]
        out[region]["met_hd95"] = values["lesionwise_hd95"]
    return out


def _run(cases, reference_runner, tmp_path):
    job = [
        {
            "id": c["id"],
            "kind": "brats2026",
            "config": CONFIG[c["challenge"]],
            "pred": c["pred"],
            "gt": c["gt"],
            "spacing": c["spacing"],
            "mets_parse": True,
        }
        for c in cases
    ]
    reference = reference_runner(job, tmp_path)
    stats = {"cases": 0, "dice": 0.0, "hd95": 0.0}
    for case in cases:
        _compare(case, _evaluate_ours(case), reference[case["id"]], stats)
    return stats


def test_brats2026_matches_brats_evaluation_on_random_cases(reference_runner, tmp_path):
    stats = _run(_cases(), reference_runner, tmp_path)
    assert stats["cases"] == N_SMALL
    print(
        f"\nbrats2026 differential: {stats['cases']} cases, max |diff| dice-like {stats['dice']:.2e}, "
        f"hd95 {stats['hd95']:.2e} mm"
    )


@pytest.mark.slow
def test_brats2026_matches_brats_evaluation_full_size(reference_runner, tmp_path):
    stats = _run(_full_size_cases(), reference_runner, tmp_path)
    assert stats["cases"] == 3
