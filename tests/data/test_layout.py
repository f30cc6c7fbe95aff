"""Case discovery for every naming convention, loading, atomic writes and `bratstune inspect` on good data."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bratstune.cli import main
from bratstune.data.case import MODALITIES, Case, load_case, validate_case
from bratstune.data.layout import default_scheme, discover
from bratstune.data.nifti import write_nifti_atomic

SHAPE = (8, 9, 10)
AFFINE = np.diag([1.0, 1.5, 2.0, 1.0])

# file tokens per convention, in MODALITIES order, then the label token
TOKENS = {
    "brats2023": (("-t1n", "-t1c", "-t2w", "-t2f"), "-seg"),
    "brats2021": (("_t1", "_t1ce", "_t2", "_flair"), "_seg"),
    "brats2020": (("_t1", "_t1ce", "_t2", "_flair"), "_seg"),
}


def write(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def seg_volume(values=(1, 2, 3)) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    for i, v in enumerate(values):
        seg[1 + 2 * i : 3 + 2 * i, 2:5, 3:6] = v
    return seg


def write_case(
    root: Path,
    case_id: str,
    convention: str,
    *,
    flat: bool = False,
    label: bool = True,
    ext: str = ".nii.gz",
    values=(1, 2, 3),
) -> Path:
    """Write one case; modality i is filled with the constant 10*(i+1) so channel order is checkable."""
    folder = root if flat else root / case_id
    image_tokens, label_token = TOKENS[convention]
    for i, token in enumerate(image_tokens):
        write(folder / f"{case_id}{token}{ext}", np.full(SHAPE, 10.0 * (i + 1), dtype=np.float32))
    if label:
        write(folder / f"{case_id}{label_token}{ext}", seg_volume(values))
    return folder


def write_msd(root: Path, ids=("BRATS_001", "BRATS_002"), test_ids=("BRATS_101",)) -> None:
    # MSD channel order: FLAIR, T1w, t1gd, T2w -> constants 0, 1, 2, 3
    image = np.stack([np.full(SHAPE, float(c), dtype=np.float32) for c in range(4)], axis=-1)
    image[-1, -1, -1] = 9.0  # no channel is blank (an all-zero modality is refused)
    for cid in ids:
        write(root / "imagesTr" / f"{cid}.nii.gz", image)
        write(root / "labelsTr" / f"{cid}.nii.gz", seg_volume())
    for cid in test_ids:
        write(root / "imagesTs" / f"{cid}.nii.gz", image)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (root / "labelsTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")


# -- discovery --------------------------------------------------------------------------------------

CONVENTION_CASES = [
    ("brats2023", ["BraTS-GLI-00000-000", "BraTS-GLI-00002-001"], "GLI"),
    ("brats2021", ["BraTS2021_00000", "BraTS2021_01666"], None),
    ("brats2020", ["BraTS20_Training_001", "BraTS20_Training_002"], None),
    ("brats2020", ["Brats18_2013_2_1", "Brats18_TCIA01_131_1"], None),
    ("brats2020", ["BraTS19_2013_0_1", "BraTS19_CBICA_AAB_1"], None),
    ("brats2020", ["Brats17_TCIA_105_1", "Brats17_2013_10_1"], None),
]


@pytest.mark.parametrize("flat", [False, True], ids=["per-case-folders", "flat"])
@pytest.mark.parametrize("convention, ids, challenge", CONVENTION_CASES)
def test_discover_each_convention(tmp_path, convention, ids, challenge, flat):
    for cid in ids:
        write_case(tmp_path, cid, convention, flat=flat)
    cohort = discover(tmp_path)
    assert cohort.convention == convention
    assert [c.case_id for c in cohort.cases] == sorted(ids)
    assert cohort.problems == [] and cohort.ignored == []
    for case in cohort.cases:
        assert tuple(case.images) == MODALITIES
        assert case.label is not None and case.label.exists()
        assert case.challenge == challenge and case.convention == convention and case.channel is None
        assert all(p.parent == case.label.parent for p in case.images.values())


@pytest.mark.parametrize(
    "token",
    ["GLI", "SSA", "MEN", "MET", "PED", "GoAT", "MEN-RT", "goat"],
)
def test_brats2023_challenge_tokens(tmp_path, token):
    write_case(tmp_path, f"BraTS-{token}-00007-000", "brats2023")
    (case,) = discover(tmp_path).cases
    assert case.case_id == f"BraTS-{token}-00007-000"
    assert case.challenge == ("GoAT" if token == "goat" else token)


def test_brats2020_training_and_validation_without_labels(tmp_path):
    write_case(tmp_path, "BraTS20_Training_001", "brats2020")
    write_case(tmp_path, "BraTS20_Validation_001", "brats2020", label=False)
    cohort = discover(tmp_path)
    assert [(c.case_id, c.label is not None) for c in cohort.cases] == [
        ("BraTS20_Training_001", True),
        ("BraTS20_Validation_001", False),
    ]
    assert [c.case_id for c in cohort.labelled] == ["BraTS20_Training_001"]


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_uncompressed_and_compressed(tmp_path, ext):
    write_case(tmp_path, "BraTS-SSA-00001-000", "brats2023", ext=ext)
    (case,) = discover(tmp_path).cases
    assert case.images["t2f"].name == f"BraTS-SSA-00001-000-t2f{ext}"
    assert load_case(case).image.shape == (4, *SHAPE)


def test_nested_release_folder_and_ignored_files(tmp_path):
    release = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    write_case(release, "BraTS-GLI-00000-000", "brats2023")
    write(release / "atlas.nii.gz", np.zeros(SHAPE, np.float32))
    (release / "BraTS-GLI-00000-000" / "._BraTS-GLI-00000-000-t1n.nii.gz").write_bytes(b"\x00")
    (tmp_path / ".hidden").mkdir()
    write(tmp_path / ".hidden" / "BraTS-GLI-00009-000-t1n.nii.gz", np.zeros(SHAPE, np.float32))
    (tmp_path / "README.txt").write_text("not an image")
    cohort = discover(tmp_path)
    assert [c.case_id for c in cohort.cases] == ["BraTS-GLI-00000-000"]
    assert [p.name for p in cohort.ignored] == ["atlas.nii.gz"]


def test_forced_convention_ignores_other_names(tmp_path):
    write_case(tmp_path, "BraTS-GLI-00000-000", "brats2023")
    write_case(tmp_path, "BraTS2021_00001", "brats2021")
    cohort = discover(tmp_path, convention="brats2021")
    assert [c.case_id for c in cohort.cases] == ["BraTS2021_00001"]
    assert len(cohort.ignored) == 5


def test_single_modality_cohort(tmp_path):
    folder = tmp_path / "BraTS-MEN-RT-0001-1"
    write(folder / "BraTS-MEN-RT-0001-1_t1c.nii.gz", np.ones(SHAPE, np.float32))
    write(folder / "BraTS-MEN-RT-0001-1_seg.nii.gz", seg_volume((1,)))
    (case,) = discover(tmp_path, modalities=("t1c",)).cases
    assert case.challenge == "MEN-RT" and tuple(case.images) == ("t1c",)
    data = load_case(case, scheme=default_scheme(case))
    assert data.image.shape == (1, *SHAPE)
    assert default_scheme(case).name == "brats2024_men_rt"


def test_msd_layout(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    write_msd(root)
    cohort = discover(tmp_path)
    assert cohort.convention == "msd"
    assert [(c.case_id, c.label is not None) for c in cohort.cases] == [
        ("BRATS_001", True),
        ("BRATS_002", True),
        ("BRATS_101", False),
    ]
    case = cohort.cases[0]
    assert set(case.images.values()) == {root / "imagesTr" / "BRATS_001.nii.gz"}
    assert dict(case.channel) == {"t2f": 0, "t1n": 1, "t1c": 2, "t2w": 3}
    data = load_case(case, scheme="msd_task01")
    # canonical order t1n, t1c, t2w, t2f <- MSD channels 1, 2, 3, 0
    np.testing.assert_array_equal(data.image[:, 0, 0, 0], [1.0, 2.0, 3.0, 0.0])
    assert data.label.dtype == np.uint8 and data.label.shape == SHAPE
    assert default_scheme(case).name == "msd_task01"


def test_msd_channel_order_from_dataset_json(tmp_path):
    write_msd(tmp_path, ids=("BRATS_001",), test_ids=())
    meta = {"modality": {"0": "T1w", "1": "t1gd", "2": "T2w", "3": "FLAIR"}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    (case,) = discover(tmp_path).cases
    assert dict(case.channel) == {"t1n": 0, "t1c": 1, "t2w": 2, "t2f": 3}
    np.testing.assert_array_equal(load_case(case).image[:, 0, 0, 0], [0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "case_id, convention, expected",
    [
        ("BraTS-GLI-00000-000", "brats2023", "brats2023"),
        ("BraTS-PED-00000-000", "brats2023", "brats2024_ped"),
        ("BraTS-XYZ-00000-000", "brats2023", "brats2023"),
        ("BraTS2021_00000", "brats2021", "legacy"),
        ("BraTS20_Training_001", "brats2020", "legacy"),
    ],
)
def test_default_scheme(tmp_path, case_id, convention, expected):
    write_case(tmp_path, case_id, convention, values=(1,))
    (case,) = discover(tmp_path).cases
    assert default_scheme(case).name == expected


def test_default_scheme_with_year(tmp_path):
    write_case(tmp_path, "BraTS-GLI-02000-000", "brats2023")
    (case,) = discover(tmp_path).cases
    assert default_scheme(case, year=2024).name == "brats2024_gli"


# -- loading ----------------------------------------------------------------------------------------


def test_load_case_arrays(tmp_path):
    write_case(tmp_path, "BraTS2021_00042", "brats2021", values=(1, 2, 4))
    (case,) = discover(tmp_path).cases
    data = load_case(case, scheme="legacy")
    assert data.image.dtype == np.float32 and data.image.shape == (4, *SHAPE)
    # t1n, t1c, t2w, t2f <- _t1, _t1ce, _t2, _flair written as 10, 20, 30, 40
    np.testing.assert_array_equal(data.image[:, 0, 0, 0], [10.0, 20.0, 30.0, 40.0])
    assert data.label.dtype == np.uint8
    np.testing.assert_array_equal(np.unique(data.label), [0, 1, 2, 4])
    np.testing.assert_allclose(data.affine, AFFINE)
    assert data.spacing == (1.0, 1.5, 2.0)
    assert data.header.get_data_shape() == SHAPE


def test_load_case_float_label_and_trailing_singleton(tmp_path):
    folder = write_case(tmp_path, "BraTS-MET-00001-000", "brats2023", label=False)
    write(folder / "BraTS-MET-00001-000-t1n.nii.gz", np.ones((*SHAPE, 1), np.float32))
    write(folder / "BraTS-MET-00001-000-seg.nii.gz", seg_volume().astype(np.float64))
    (case,) = discover(tmp_path).cases
    data = load_case(case, scheme="brats2023")
    assert data.image.shape == (4, *SHAPE)
    assert data.label.dtype == np.uint8 and set(np.unique(data.label)) == {0, 1, 2, 3}


def test_validate_case_clean(tmp_path):
    write_case(tmp_path, "BraTS-GLI-00000-000", "brats2023")
    (case,) = discover(tmp_path).cases
    for read_voxels in (True, False):
        report = validate_case(case, scheme="brats2023", read_voxels=read_voxels)
        assert report.problems == []
        assert report.shape == SHAPE and report.spacing == (1.0, 1.5, 2.0)
        assert report.label_values == (0, 1, 2, 3)


def test_case_is_hashable(tmp_path):
    write_case(tmp_path, "BraTS-GLI-00000-000", "brats2023")
    (case,) = discover(tmp_path).cases
    assert isinstance(case, Case) and len({case, case}) == 1


# -- atomic writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, stored",
    [
        (np.arange(720, dtype=np.float32).reshape(SHAPE), np.float32),
        (seg_volume(), np.uint8),
        (seg_volume() > 0, np.uint8),
        (seg_volume().astype(np.int64), np.int32),
    ],
    ids=["float32", "uint8", "bool", "int64"],
)
def test_write_nifti_atomic_round_trip(tmp_path, array, stored):
    # a float header from an image must not turn a label into float
    header = nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE).header
    out = tmp_path / "sub" / "pred.nii.gz"
    write_nifti_atomic(out, array, AFFINE, header)
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    img = nib.load(str(out))
    assert img.get_data_dtype() == stored
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), array)
    np.testing.assert_allclose(img.affine, AFFINE)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.nii.gz"]  # no temp file left


def test_write_nifti_atomic_replaces_and_keeps_old_file_on_failure(tmp_path):
    out = tmp_path / "x.nii"
    write_nifti_atomic(out, np.zeros(SHAPE, np.float32), AFFINE)
    write_nifti_atomic(out, np.ones(SHAPE, np.float32), AFFINE)
    assert np.asanyarray(nib.load(str(out)).dataobj).max() == 1.0
    with pytest.raises(Exception):
        write_nifti_atomic(out, np.zeros(SHAPE, dtype=object), AFFINE)
    assert np.asanyarray(nib.load(str(out)).dataobj).max() == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii"]


def test_write_nifti_atomic_rejects_other_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"x\.npy: output file name must end with \.nii or \.nii\.gz"):
        write_nifti_atomic(tmp_path / "x.npy", np.zeros(SHAPE), AFFINE)


# -- inspect CLI on clean data ------------------------------------------------------------------------


def test_inspect_text(tmp_path, capsys):
    write_case(tmp_path, "BraTS-GLI-00000-000", "brats2023", values=(1, 2))
    write_case(tmp_path, "BraTS-GLI-00001-000", "brats2023", values=(1, 2, 3))
    write_case(tmp_path, "BraTS-GLI-00002-000", "brats2023", label=False)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "convention    brats2023" in out
    assert "cases         3 (2 with labels, 1 without)" in out
    assert "modalities    t1n, t1c, t2w, t2f" in out
    assert "shapes        8x9x10 (3)" in out
    assert "spacings      1x1.5x2 mm (3)" in out
    assert "label values  0 (2 cases), 1 (2 cases), 2 (2 cases), 3 (1 case)" in out
    assert "brats2023: 1 NCR, 2 ED, 3 ET" in out
    assert "problems      none" in out


def test_inspect_json_guesses_post_treatment_gli(tmp_path, capsys):
    write_case(tmp_path, "BraTS-GLI-02000-000", "brats2023", values=(1, 2, 3, 4))
    assert main(["inspect", str(tmp_path), "--json", "--quick", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["convention"] == "brats2023" and report["cases"] == 1
    assert report["label_values"] == {"0": 1, "1": 1, "2": 1, "3": 1, "4": 1}
    assert report["schemes"] == {"brats2024_gli": 1}
    assert report["problems"] == []


@pytest.mark.parametrize("workers", ["1", "3"])
def test_inspect_msd_json(tmp_path, capsys, workers):
    write_msd(tmp_path)
    assert main(["inspect", str(tmp_path), "--json", "--workers", workers]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["convention"] == "msd"
    assert (report["cases"], report["labelled"]) == (3, 2)
    assert report["shapes"] == {"8x9x10": 3}
    assert report["schemes"] == {"msd_task01": 3}
