"""Hand-computed tables for ``lesion_wise``: every rule of the brats2023 protocol, the brats2026
matching rules, and the input checks.

Cases use label 3 only (so WT = TC = ET) unless a test says otherwise; a 4×4×4 cube is 64 voxels
(> 50 mm³), a 2×2×2 cube 8 voxels (≤ 50 mm³, dropped by GLI/SSA/MEN/PED).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from bratstune.metrics import lesion_wise, protocol_regions

SHAPE = (40, 40, 40)
NAN = float("nan")


def vol(*boxes, label=3):
    seg = np.zeros(SHAPE, np.uint8)
    for box in boxes:
        x, y, z, sx, sy, sz = box
        seg[x : x + sx, y : y + sy, z : z + sz] = label
    return seg


CUBE_A = (5, 5, 5, 4, 4, 4)
CUBE_B = (25, 25, 25, 4, 4, 4)
SMALL = (30, 5, 30, 2, 2, 2)
VOXEL_FAR = (35, 35, 2, 1, 1, 1)

# (name, challenge, gt boxes, pred boxes, spacing, expected ET values)
BRATS2023_TABLE = [
    (
        "perfect",
        "GLI",
        [CUBE_A],
        [CUBE_A],
        (1, 1, 1),
        dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, legacy_dice=1.0, legacy_hd95=0.0, num_tp=1, num_fp=0, num_fn=0),
    ),
    (
        "missed lesion: Dice 0, HD95 374",
        "GLI",
        [CUBE_A, CUBE_B],
        [CUBE_A],
        (1, 1, 1),
        dict(
            lesionwise_dice=0.5,
            lesionwise_hd95=187.0,
            legacy_dice=2 * 64 / 192,
            num_tp=1,
            num_fp=0,
            num_fn=1,
            sensitivity=0.5,
            specificity=1.0,
        ),
    ),
    (
        "1-voxel false positive, no size filter on predictions",
        "GLI",
        [CUBE_A],
        [CUBE_A, VOXEL_FAR],
        (1, 1, 1),
        dict(lesionwise_dice=0.5, lesionwise_hd95=187.0, num_tp=1, num_fp=1, num_fn=0),
    ),
    (
        "missed lesion below 50 mm3 is dropped",
        "GLI",
        [CUBE_A, SMALL],
        [CUBE_A],
        (1, 1, 1),
        dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, num_tp=1, num_fp=0, num_fn=0),
    ),
    (
        "hit lesion below 50 mm3 is dropped and its match is no FP",
        "GLI",
        [CUBE_A, SMALL],
        [CUBE_A, SMALL],
        (1, 1, 1),
        dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, num_tp=1, num_fp=0, num_fn=0),
    ),
    (
        "GT parts 3 voxels apart merge with dilation 3 (GLI)",
        "GLI",
        [CUBE_A, (12, 5, 5, 4, 4, 4)],
        [CUBE_A],
        (1, 1, 1),
        dict(lesionwise_dice=2 * 64 / 192, num_tp=1, num_fp=0, num_fn=0, num_gt_lesions=1),
    ),
    (
        "...and stay two lesions with dilation 1 (MET)",
        "MET",
        [CUBE_A, (12, 5, 5, 4, 4, 4)],
        [CUBE_A],
        (1, 1, 1),
        dict(lesionwise_dice=0.5, lesionwise_hd95=187.0, num_tp=1, num_fp=0, num_fn=1, num_gt_lesions=2),
    ),
    (
        "one component serves two lesions (MET)",
        "MET",
        [CUBE_A, (12, 5, 5, 4, 4, 4)],
        [(5, 5, 5, 11, 4, 4)],
        (1, 1, 1),
        dict(lesionwise_dice=128 / 240, num_tp=2, num_fp=0, num_fn=0),
    ),
    (
        "component 1 voxel off the lesion is inside dilation 3",
        "GLI",
        [CUBE_A],
        [CUBE_A, (10, 5, 5, 1, 1, 1)],
        (1, 1, 1),
        dict(lesionwise_dice=2 * 64 / 129, num_tp=1, num_fp=0, num_fn=0),
    ),
    (
        "...but a false positive with dilation 1",
        "MEN",
        [CUBE_A],
        [CUBE_A, (10, 5, 5, 1, 1, 1)],
        (1, 1, 1),
        dict(lesionwise_dice=0.5, lesionwise_hd95=187.0, num_tp=1, num_fp=1, num_fn=0),
    ),
    (
        "MET threshold 2 mm3: 1-voxel GT dropped, its neighbour no FP",
        "MET",
        [CUBE_A, (30, 30, 30, 1, 1, 1)],
        [CUBE_A, (31, 30, 30, 1, 1, 1)],
        (1, 1, 1),
        dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, num_tp=1, num_fp=0, num_fn=0, num_gt_lesions=2),
    ),
    (
        "both empty",
        "GLI",
        [],
        [],
        (1, 1, 1),
        dict(
            lesionwise_dice=1.0,
            lesionwise_hd95=0.0,
            legacy_dice=1.0,
            legacy_hd95=0.0,
            num_tp=0,
            num_fp=0,
            num_fn=0,
            sensitivity=1.0,
        ),
    ),
    (
        "empty prediction",
        "GLI",
        [CUBE_A],
        [],
        (1, 1, 1),
        dict(
            lesionwise_dice=0.0, lesionwise_hd95=374.0, legacy_dice=0.0, legacy_hd95=374.0, num_tp=0, num_fp=0, num_fn=1
        ),
    ),
    (
        "empty ground truth",
        "GLI",
        [],
        [CUBE_A],
        (1, 1, 1),
        dict(
            lesionwise_dice=0.0, lesionwise_hd95=374.0, legacy_dice=0.0, legacy_hd95=374.0, num_tp=0, num_fp=1, num_fn=0
        ),
    ),
    (
        "volume is voxels x voxel volume: 27 voxels of 2 mm3 are kept",
        "GLI",
        [(5, 5, 5, 3, 3, 3)],
        [],
        (1, 1, 2),
        dict(lesionwise_dice=0.0, lesionwise_hd95=374.0, num_fn=1),
    ),
    (
        "...27 voxels of 1 mm3 are dropped",
        "GLI",
        [(5, 5, 5, 3, 3, 3)],
        [],
        (1, 1, 1),
        dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, num_fn=0),
    ),
    (
        "a lesion of exactly 50 mm3 is dropped (<=)",
        "GLI",
        [(5, 5, 5, 5, 5, 2)],
        [],
        (1, 1, 1),
        dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, num_fn=0, num_gt_lesions=1),
    ),
    (
        "51 mm3 is kept",
        "GLI",
        [(5, 5, 5, 3, 17, 1)],
        [],
        (1, 1, 1),
        dict(lesionwise_dice=0.0, lesionwise_hd95=374.0, num_fn=1),
    ),
]


def _check(values: dict, expected: dict, where: str) -> None:
    for key, want in expected.items():
        got = values[key]
        if isinstance(want, float) and math.isnan(want):
            assert math.isnan(got), f"{where} {key}: {got}, expected NaN"
        else:
            assert got == pytest.approx(want, abs=1e-9), f"{where} {key}: {got}, expected {want}"


@pytest.mark.parametrize(
    "name,challenge,gt,pred,spacing,expected", BRATS2023_TABLE, ids=[r[0] for r in BRATS2023_TABLE]
)
def test_brats2023_table(name, challenge, gt, pred, spacing, expected):
    out = lesion_wise(vol(*pred), vol(*gt), challenge, "brats2023", spacing)
    assert set(out) == {"WT", "TC", "ET"}
    for region in ("WT", "TC", "ET"):  # label 3 only: the three regions coincide
        _check(out[region], expected, f"{name} {region}")


def test_brats2023_regions_follow_labels():
    gt = vol(CUBE_A, label=2)  # oedema only: WT has a lesion, TC and ET are empty
    pred = vol(CUBE_A, label=2)
    pred[6, 6, 6] = 1  # NCR inside the WT lesion: a TC false positive, no change to WT
    out = lesion_wise(pred, gt, "GLI")
    _check(out["WT"], dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, num_tp=1, num_fp=0), "WT")
    _check(out["TC"], dict(lesionwise_dice=0.0, lesionwise_hd95=374.0, num_fp=1, legacy_hd95=374.0), "TC")
    _check(out["ET"], dict(lesionwise_dice=1.0, lesionwise_hd95=0.0, legacy_dice=1.0, legacy_hd95=0.0), "ET")


def test_brats2023_lesion_table():
    out = lesion_wise(vol(CUBE_A), vol(CUBE_A, CUBE_B, SMALL), "GLI", lesions=True)
    rows = sorted(out["ET"]["lesions"], key=lambda r: r["voxels"])
    assert [r["voxels"] for r in rows] == [8, 64, 64]
    assert [r["counted"] for r in rows] == [False, True, True]
    assert sorted((r["dice"], r["hd95"]) for r in rows[1:]) == [(0.0, 374.0), (1.0, 0.0)]


def test_brats2023_hd95_is_distance_weighted_by_surface():
    # a cube against the same cube shifted by 2 voxels: every directed distance is 0 or 2 mm
    out = lesion_wise(vol((10, 10, 10, 8, 8, 8)), vol((12, 10, 10, 8, 8, 8)), "GLI")
    assert out["ET"]["lesionwise_hd95"] == pytest.approx(2.0)
    assert out["ET"]["legacy_hd95"] == pytest.approx(2.0)
    assert out["ET"]["lesionwise_dice"] == pytest.approx(2 * 6 * 64 / (2 * 512))


# ------------------------------------------------------------------------------------------------
# brats2026
# ------------------------------------------------------------------------------------------------
def test_brats2026_one_to_one_matching():
    # one predicted bar (x 5..12) over cube A (x 5..8) and one slice of cube B (x 12..15):
    # a single component, so only one of the two GT lesions can be matched (the larger Dice)
    gt = vol(CUBE_A, (12, 5, 5, 4, 4, 4))
    pred = vol((5, 5, 5, 8, 4, 4))
    out = lesion_wise(pred, gt, "MET", "brats2026", lesions=True)["ET"]
    assert (out["num_tp"], out["num_fp"], out["num_fn"]) == (1, 0, 1)
    # pred = 4x4x8 = 128 voxels; Dice with cube A = 128/192, with the second cube = 32/192
    assert out["lesionwise_dice"] == pytest.approx(2 * 64 / 192)
    assert out["precision"] == 1.0 and out["recall"] == 0.5
    assert out["f1"] == pytest.approx(1 / (1 + 0.5 * 0 + 0.5 * 1))


def test_brats2026_edge_cases():
    empty = np.zeros(SHAPE, np.uint8)
    both = lesion_wise(empty, empty, "GLI", "brats2026")["ET"]
    assert math.isnan(both["lesionwise_dice"]) and math.isnan(both["lesionwise_hd95"]) and math.isnan(both["f1"])
    assert math.isnan(both["legacy_dice"])
    missed = lesion_wise(empty, vol(CUBE_A), "GLI", "brats2026")["ET"]
    assert missed["lesionwise_dice"] == 0.0 and math.isinf(missed["lesionwise_hd95"])
    assert missed["legacy_dice"] == 0.0 and missed["legacy_hd95"] == 373.0
    assert missed["f1"] == 0.0 and math.isnan(missed["precision"]) and missed["recall"] == 0.0


def test_brats2026_penalised_variant():
    # matched big lesion (Dice 1), missed big lesion, 1 FP -> Dice (1+0+0)/3, HD95 (0+373+373)/3
    gt = vol(CUBE_A, CUBE_B)
    pred = vol(CUBE_A, VOXEL_FAR)
    out = lesion_wise(pred, gt, "MET", "brats2026", penalised=True)["ET"]
    assert out["lesionwise_dice"] == pytest.approx(1 / 3)
    assert out["lesionwise_hd95"] == pytest.approx(2 * 373 / 3)
    assert out["lesionwise_dice_unpenalised"] == 1.0


def test_brats2026_groups_per_challenge():
    assert protocol_regions("GLI", "brats2026") == {
        "NETC": (1,),
        "SNFH": (2,),
        "ET": (3,),
        "RC": (4,),
        "TC": (1, 3),
        "WT": (1, 2, 3),
    }
    assert protocol_regions("PED", "brats2026")["WT"] == (1, 2, 3, 4)
    assert set(protocol_regions("MET", "brats2026")) == {"ET", "RC", "TC", "WT"}
    assert set(protocol_regions("BraTS-SSA", "brats2026")) == {"ET", "TC", "WT"}


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(protocol="brats2024"), "unknown protocol"),
        (dict(challenge="XYZ"), "unknown challenge"),
        (dict(spacing=(1, 1)), "spacing"),
        (dict(spacing=(1, 0, 1)), "spacing"),
        (dict(penalised=True), "penalised"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(pred=vol(CUBE_A), gt=vol(CUBE_A), challenge="GLI")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lesion_wise(**args)


def test_bad_arrays():
    with pytest.raises(ValueError, match="one shape"):
        lesion_wise(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), "GLI")
    with pytest.raises(ValueError, match="3-D"):
        lesion_wise(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), "GLI")
    with pytest.raises(ValueError, match="negative"):
        lesion_wise(-np.ones((4, 4, 4), np.int16), np.zeros((4, 4, 4), np.int16), "GLI")
    with pytest.raises(ValueError, match="no brats2026 region"):
        lesion_wise(vol(CUBE_A, label=4), vol(CUBE_A), "SSA", "brats2026")


@pytest.mark.parametrize("seed", range(6))
def test_per_component_surfaces_equal_whole_mask_surfaces(seed):
    """The surface of a union of components is the concatenation of theirs (both HD95 kinds)."""
    from scipy import ndimage

    from bratstune.metrics.surface import hd95_surfel, hd95_voxel

    rng = np.random.default_rng(seed)

    def blobs():
        noise = ndimage.gaussian_filter(rng.normal(size=(30, 30, 30)), 1.5)
        return np.where(noise > np.quantile(noise, 0.93), 3, 0).astype(np.uint8)

    gt, pred = blobs(), blobs()
    pred[gt == 3] = np.where(rng.random(int((gt == 3).sum())) < 0.7, 3, 0)  # overlap
    spacing = (1.0, 1.2, 2.0)
    ours23 = lesion_wise(pred, gt, "MET", "brats2023", spacing)["ET"]["legacy_hd95"]
    assert ours23 == pytest.approx(hd95_surfel(gt == 3, pred == 3, spacing), abs=1e-12)
    ours26 = lesion_wise(pred, gt, "MET", "brats2026", spacing)["ET"]["legacy_hd95"]
    assert ours26 == pytest.approx(hd95_voxel(gt == 3, pred == 3, spacing), abs=1e-12)
