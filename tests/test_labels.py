"""Label schemes, regions, hierarchical decode with thresholds, and conversions between schemes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from bratstune.errors import ConfigError, DataError
from bratstune.labels import (
    CHALLENGES,
    SCHEMES,
    LabelScheme,
    SchemeName,
    check_labels,
    convert_labels,
    get_scheme,
    label_values,
    labels_to_regions,
    regions_to_labels,
    scheme_for,
)

# -- scheme definitions --------------------------------------------------------------------------

SCHEME_TABLE = [
    ("brats2023", {1: "NCR", 2: "ED", 3: "ET"}, {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}, ("WT", "TC", "ET")),
    (
        "brats2024_gli",
        {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
        {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,), "RC": (4,), "NETC": (1,), "SNFH": (2,)},
        ("RC", "WT", "TC", "ET"),
    ),
    (
        "brats2024_ped",
        {1: "ET", 2: "NET", 3: "CC", 4: "ED"},
        {"WT": (1, 2, 3, 4), "TC": (1, 2, 3), "ET": (1,), "NET": (2,), "CC": (3,), "ED": (4,)},
        ("WT", "TC", "CC", "ET"),
    ),
    ("legacy", {1: "NCR/NET", 2: "ED", 4: "ET"}, {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}, ("WT", "TC", "ET")),
    ("msd_task01", {1: "ED", 2: "NET", 3: "ET"}, {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}, ("WT", "TC", "ET")),
    ("brats2024_men_rt", {1: "GTV"}, {"GTV": (1,)}, ("GTV",)),
]


@pytest.mark.parametrize("name, labels, regions, train_regions", SCHEME_TABLE)
def test_scheme_definitions(name, labels, regions, train_regions):
    scheme = get_scheme(name)
    assert scheme.name == name
    assert dict(scheme.labels) == labels
    assert dict(scheme.regions) == regions
    assert scheme.train_regions == train_regions
    assert scheme.num_classes == 1 + len(labels)


def test_rc_is_outside_wt_and_tc_in_2024_gli():
    gli = get_scheme("brats2024_gli")
    assert 4 not in gli.regions["WT"] and 4 not in gli.regions["TC"]


def test_ped_decode_steps_are_not_a_single_chain():
    steps = get_scheme("brats2024_ped").decode_steps()
    assert [(s.region, s.label, s.inside) for s in steps] == [
        ("WT", 4, None),
        ("TC", 2, "WT"),
        ("CC", 3, "TC"),
        ("ET", 1, "TC"),  # inside TC, not inside CC
    ]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("brats2023", "brats2023"),
        ("BraTS2023", "brats2023"),
        (SchemeName.LEGACY, "legacy"),
        ("brats2021", "legacy"),
        ("msd", "msd_task01"),
        (" PED ", "brats2024_ped"),
    ],
)
def test_get_scheme_names_and_aliases(name, expected):
    assert get_scheme(name).name == expected


def test_get_scheme_unknown_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown label scheme 'brats2032' \(did you mean 'brats2023'\?\)"):
        get_scheme("brats2032")


def test_get_scheme_passes_a_scheme_through():
    scheme = get_scheme("legacy")
    assert get_scheme(scheme) is scheme


@pytest.mark.parametrize(
    "challenge, year, expected",
    [
        ("GLI", None, "brats2023"),
        ("GLI", 2023, "brats2023"),
        ("gli", 2024, "brats2024_gli"),
        ("GLI", 2025, "brats2024_gli"),
        ("GLI", 2021, "legacy"),
        ("SSA", None, "brats2023"),
        ("MEN", 2023, "brats2023"),
        ("MET", None, "brats2023"),
        ("GoAT", None, "brats2023"),
        ("goat", 2024, "brats2023"),
        ("PED", None, "brats2024_ped"),
        ("PED", 2024, "brats2024_ped"),
        ("PED", 2023, "brats2023"),
        ("MEN-RT", None, "brats2024_men_rt"),
        ("BraTS2021", None, "legacy"),
        ("BraTS2018", None, "legacy"),
        ("legacy", None, "legacy"),
        ("MSD", None, "msd_task01"),
        ("Task01", None, "msd_task01"),
    ],
)
def test_scheme_for(challenge, year, expected):
    assert scheme_for(challenge, year).name == expected


def test_scheme_for_unknown_challenge_suggests():
    with pytest.raises(ConfigError, match=r"unknown challenge 'GLIO' \(did you mean 'GLI'\?\)"):
        scheme_for("GLIO")


@pytest.mark.parametrize("year", [1999, "2024", 2024.5, True])
def test_scheme_for_bad_year(year):
    with pytest.raises(ConfigError, match="year"):
        scheme_for("GLI", year)


def test_challenges_listed():
    assert {"GLI", "SSA", "MEN", "MET", "PED", "GoAT", "MEN-RT"} <= set(CHALLENGES)


def test_scheme_is_hashable_and_picklable():
    scheme = get_scheme("brats2024_ped")
    assert hash(scheme) == hash("brats2024_ped")
    clone = pickle.loads(pickle.dumps(scheme))
    assert clone == scheme and clone.decode_steps() == scheme.decode_steps()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(regions={"WT": (1, 9)}, decode=(("WT", 1),)), "unknown label values"),
        (dict(regions={"WT": (1,)}, decode=(("XX", 1),)), "unknown region"),
        (dict(regions={"WT": (1,)}, decode=(("WT", 7),)), "unknown label 7"),
        (
            dict(regions={"WT": (1,), "TC": (1,)}, decode=(("WT", 1), ("TC", 1)), decode_inside={"WT": "TC"}),
            "must come after its parent TC",
        ),
    ],
)
def test_label_scheme_validates(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LabelScheme(name="custom", labels={1: "A"}, **kwargs)


# -- checks ---------------------------------------------------------------------------------------


def test_label_values_fast_and_float_paths():
    assert label_values(np.array([[0, 3], [3, 1]], dtype=np.uint8)) == [0, 1, 3]
    assert label_values(np.array([0.0, 2.0, 2.5])) == [0, 2, 2.5]
    assert label_values(np.zeros(0)) == []


def test_check_labels_accepts_known_values():
    check_labels(np.array([0, 1, 2, 4], dtype=np.uint8), "legacy")
    check_labels(np.zeros((2, 2), dtype=np.uint8), "brats2023")


def test_check_labels_names_source_values_and_a_fitting_scheme():
    seg = np.array([0, 1, 2, 4, 4], dtype=np.uint8)
    with pytest.raises(DataError) as info:
        check_labels(seg, "brats2023", source="case-seg.nii.gz")
    msg = str(info.value)
    assert msg.startswith("case-seg.nii.gz: unknown label values [4] for scheme 'brats2023' (expected 0, 1, 2, 3)")
    assert "'legacy'" in msg and "'brats2024_gli'" in msg


# -- regions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, seg, expected",
    [
        # rows: one per train region; columns: one voxel per label value
        ("brats2023", [0, 1, 2, 3], [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]),
        ("legacy", [0, 1, 2, 4], [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]),
        ("msd_task01", [0, 1, 2, 3], [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]),
        # RC, WT, TC, ET
        ("brats2024_gli", [0, 1, 2, 3, 4], [[0, 0, 0, 0, 1], [0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0]]),
        # WT, TC, CC, ET
        ("brats2024_ped", [0, 1, 2, 3, 4], [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 0]]),
    ],
)
def test_labels_to_regions(name, seg, expected):
    out = labels_to_regions(np.array(seg, dtype=np.uint8), name)
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, np.array(expected, dtype=bool))


def test_labels_to_regions_named_regions_and_3d_shape():
    seg = np.zeros((8, 9, 10), dtype=np.uint8)
    seg[1, 1, 1] = 2
    out = labels_to_regions(seg, "brats2024_gli", ["NETC", "SNFH"])
    assert out.shape == (2, 8, 9, 10)
    assert out[1].sum() == 1 and out[0].sum() == 0
    with pytest.raises(ConfigError, match="did you mean 'SNFH'"):
        labels_to_regions(seg, "brats2024_gli", ["SNHF"])


# hand-computed: columns are voxels; each list is one region channel
DECODE_TABLE = [
    (
        "brats2023",
        {"WT": [0.2, 0.6, 0.6, 0.6, 0.9], "TC": [0.9, 0.3, 0.7, 0.7, 0.5], "ET": [0.9, 0.9, 0.1, 0.8, 0.5]},
        0.5,
        # v0 outside WT; v1 WT only (ET ignored outside TC); v2 TC; v3 ET; v4 ties count (>=)
        [0, 2, 1, 3, 3],
    ),
    (
        "brats2023",
        {"WT": [0.2, 0.6, 0.6, 0.6, 0.9], "TC": [0.9, 0.3, 0.7, 0.7, 0.5], "ET": [0.9, 0.9, 0.1, 0.8, 0.5]},
        {"TC": 0.6, "ET": 0.85},  # WT keeps 0.5
        [0, 2, 1, 1, 2],
    ),
    (
        "legacy",
        {"WT": [0.9, 0.9, 0.9], "TC": [0.1, 0.9, 0.9], "ET": [0.9, 0.1, 0.9]},
        0.5,
        [2, 1, 4],
    ),
    (
        "msd_task01",
        {"WT": [0.9, 0.9, 0.9, 0.4], "TC": [0.1, 0.9, 0.9, 0.9], "ET": [0.9, 0.1, 0.9, 0.9]},
        0.5,
        [1, 2, 3, 0],
    ),
    (
        "brats2024_gli",
        # RC alone; RC + WT (tumour wins); full tumour; nothing; RC high but threshold 0.95
        {
            "RC": [0.9, 0.9, 0.1, 0.1, 0.9],
            "WT": [0.1, 0.9, 0.9, 0.1, 0.1],
            "TC": [0.1, 0.1, 0.9, 0.9, 0.1],
            "ET": [0.1, 0.1, 0.9, 0.9, 0.1],
        },
        {"RC": 0.5},
        [4, 2, 3, 0, 4],
    ),
    (
        "brats2024_ped",
        # ED only; NET; CC; ET inside TC but outside CC; ET and CC (ET wins); nothing outside WT
        {
            "WT": [0.9, 0.9, 0.9, 0.9, 0.9, 0.1],
            "TC": [0.2, 0.9, 0.9, 0.9, 0.9, 0.9],
            "CC": [0.9, 0.1, 0.9, 0.1, 0.9, 0.9],
            "ET": [0.9, 0.1, 0.1, 0.9, 0.9, 0.9],
        },
        0.5,
        [4, 2, 3, 1, 1, 0],
    ),
    (
        "brats2024_ped",
        {
            "WT": [0.9, 0.9, 0.9, 0.9, 0.9, 0.1],
            "TC": [0.2, 0.9, 0.9, 0.9, 0.9, 0.9],
            "CC": [0.9, 0.1, 0.9, 0.1, 0.9, 0.9],
            "ET": [0.9, 0.1, 0.1, 0.9, 0.9, 0.9],
        },
        {"TC": 0.1, "ET": 0.95},  # TC now covers v0 (whose CC then fires); ET never fires
        [3, 2, 3, 2, 3, 0],
    ),
]


@pytest.mark.parametrize("name, probs, thresholds, expected", DECODE_TABLE)
def test_regions_to_labels_hand_computed(name, probs, thresholds, expected):
    scheme = get_scheme(name)
    stacked = np.array([probs[r] for r in scheme.train_regions], dtype=np.float32)
    out = regions_to_labels(stacked, scheme, thresholds)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_regions_to_labels_custom_channel_order():
    probs = {"WT": [0.9, 0.9], "TC": [0.1, 0.9], "ET": [0.1, 0.9]}
    order = ("ET", "WT", "TC")
    out = regions_to_labels(np.array([probs[r] for r in order]), "brats2023", regions=order)
    np.testing.assert_array_equal(out, [2, 3])


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_regions_round_trip_every_scheme(name):
    scheme = get_scheme(name)
    rng = np.random.default_rng(0)
    seg = rng.choice([0, *scheme.values], size=(8, 9, 10)).astype(np.uint8)
    regions = labels_to_regions(seg, scheme).astype(np.float32)
    np.testing.assert_array_equal(regions_to_labels(regions, scheme), seg)
    np.testing.assert_array_equal(regions_to_labels(regions.astype(bool), scheme), seg)


def test_regions_to_labels_bad_inputs():
    with pytest.raises(ValueError, match=r"expected probabilities of shape \(R=3, X, Y, Z\)"):
        regions_to_labels(np.zeros((2, 4, 4, 4)), "brats2023")
    with pytest.raises(ValueError, match=r"no channel for regions \['ET'\]"):
        regions_to_labels(np.zeros((2, 4)), "brats2023", regions=("WT", "TC"))
    with pytest.raises(ConfigError, match="did you mean 'ET'"):
        regions_to_labels(np.zeros((3, 4)), "brats2023", {"ETT": 0.3})
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        regions_to_labels(np.zeros((3, 4)), "brats2023", 1.5)


# -- conversions ---------------------------------------------------------------------------------

ADULT_LIKE = ["legacy", "brats2023", "msd_task01"]


@pytest.mark.parametrize(
    "src, dst, seg, expected",
    [
        ("legacy", "brats2023", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("brats2023", "legacy", [0, 1, 2, 3], [0, 1, 2, 4]),
        ("brats2023", "msd_task01", [0, 1, 2, 3], [0, 2, 1, 3]),
        ("msd_task01", "legacy", [0, 1, 2, 3], [0, 2, 1, 4]),
        ("brats2023", "brats2024_ped", [0, 1, 2, 3], [0, 2, 4, 1]),
        ("brats2024_ped", "brats2023", [0, 1, 2, 4], [0, 3, 1, 2]),
        ("brats2024_gli", "brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
        ("legacy", "brats2024_gli", [0, 1, 2, 4], [0, 1, 2, 3]),
    ],
)
def test_convert_labels_table(src, dst, seg, expected):
    out = convert_labels(np.array(seg, dtype=np.uint8), src, dst)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("src", ADULT_LIKE)
@pytest.mark.parametrize("dst", ADULT_LIKE + ["brats2024_ped", "brats2024_gli"])
def test_convert_round_trip_preserves_regions(src, dst):
    scheme = get_scheme(src)
    seg = np.random.default_rng(1).choice([0, *scheme.values], size=(8, 9, 10)).astype(np.uint8)
    there = convert_labels(seg, src, dst)
    np.testing.assert_array_equal(convert_labels(there, dst, src), seg)
    np.testing.assert_array_equal(
        labels_to_regions(seg, src, ["WT", "TC", "ET"]), labels_to_regions(there, dst, ["WT", "TC", "ET"])
    )


@pytest.mark.parametrize(
    "src, dst, seg, message",
    [
        (
            "brats2024_ped",
            "brats2023",
            [0, 1, 3],
            r"label value 3 \(CC\) of scheme 'brats2024_ped' has no equivalent in scheme 'brats2023'",
        ),
        (
            "brats2024_gli",
            "legacy",
            [0, 4, 1],
            r"label value 4 \(RC\) of scheme 'brats2024_gli' has no equivalent in scheme 'legacy'",
        ),
        ("brats2024_men_rt", "brats2023", [0, 1], r"label value 1 \(GTV\)"),
    ],
)
def test_convert_unmappable_value_is_named(src, dst, seg, message):
    with pytest.raises(DataError, match=message):
        convert_labels(np.array(seg, dtype=np.uint8), src, dst, source="x-seg.nii.gz")


def test_convert_unknown_source_value():
    with pytest.raises(DataError, match=r"unknown label values \[3\] for scheme 'legacy'"):
        convert_labels(np.array([0, 3], dtype=np.uint8), "legacy", "brats2023")


def test_convert_same_scheme_copies():
    seg = np.array([0, 1, 2], dtype=np.uint8)
    out = convert_labels(seg, "brats2023", "brats2023")
    out[0] = 9
    assert seg[0] == 0
