"""Bad input: each problem is a DataError naming the file and the problem; inspect reports them all."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bratstune.cli import main
from bratstune.data.case import load_case, validate_case
from bratstune.data.layout import discover
from bratstune.errors import DataError

SHAPE = (8, 9, 10)
MODS = ("t1n", "t1c", "t2w", "t2f")


def write(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def good_case(root: Path, case_id: str = "BraTS-GLI-00000-000", *, label: bool = True) -> Path:
    """Random (poorly compressible) images, so that truncating a file leaves its header intact."""
    folder = root / case_id
    rng = np.random.default_rng(0)
    for mod in MODS:
        write(folder / f"{case_id}-{mod}.nii.gz", rng.random(SHAPE, dtype=np.float32))
    if label:
        seg = np.zeros(SHAPE, dtype=np.uint8)
        seg[2:5, 2:5, 2:5] = 1
        seg[3, 3, 3] = 3
        write(folder / f"{case_id}-seg.nii.gz", seg)
    return folder


def only_case(root: Path):
    (case,) = discover(root).cases
    return case


def assert_problem(exc: DataError, path: Path, *fragments: str) -> None:
    msg = str(exc)
    assert exc.path == path, msg
    assert msg.startswith(f"{path}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg


# -- corrupt files -----------------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    # header intact, gzip stream cut -> EOFError inside nibabel
    "truncated-gzip": (lambda p: truncate(p, 0.6), "cannot decode voxel data (EOFError"),
    # gzip CRC trailer broken, voxels intact -> gzip.BadGzipFile (nibabel alone does not check it)
    "bad-crc": (lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\0" * 8), "cannot decode voxel data (BadGzipFile"),
    # one byte of the deflate stream flipped -> zlib.error or BadGzipFile
    "flipped-byte": (lambda p: flip(p, 0.7), "cannot decode voxel data ("),
    "not-gzip": (lambda p: p.write_bytes(b"this is not a NIfTI file at all" * 20), "cannot read NIfTI header"),
    "empty": (lambda p: p.write_bytes(b""), "cannot read NIfTI header"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_file(tmp_path, kind):
    corrupt, fragment = CORRUPTIONS[kind]
    folder = good_case(tmp_path)
    bad = folder / "BraTS-GLI-00000-000-t2w.nii.gz"
    corrupt(bad)
    case = only_case(tmp_path)
    with pytest.raises(DataError) as info:
        load_case(case)
    assert_problem(info.value, bad, fragment)
    # the scan reports the same problem without raising
    (problem,) = validate_case(case).problems
    assert_problem(problem, bad, fragment)


def test_truncated_uncompressed_file(tmp_path):
    folder = good_case(tmp_path)
    bad = folder / "BraTS-GLI-00000-000-t1c.nii"
    write(bad, np.zeros(SHAPE, np.float32))
    (folder / "BraTS-GLI-00000-000-t1c.nii.gz").unlink()
    truncate(bad, 0.5)
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(info.value, bad, "truncated or corrupt", "Expected 2880 bytes")


# -- geometry and values -------------------------------------------------------------------------------


def test_missing_modality_strict_and_collected(tmp_path):
    folder = good_case(tmp_path)
    good_case(tmp_path, "BraTS-GLI-00001-000")
    (folder / "BraTS-GLI-00000-000-t2f.nii.gz").unlink()
    expected = folder / "BraTS-GLI-00000-000-t2f.nii.gz"
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    assert_problem(info.value, expected, "missing modality t2f of case 'BraTS-GLI-00000-000'", "found t1n, t1c, t2w")
    cohort = discover(tmp_path, strict=False)
    assert [c.case_id for c in cohort.cases] == ["BraTS-GLI-00001-000"]
    (problem,) = cohort.problems
    assert_problem(problem, expected, "missing modality t2f")


def test_missing_modality_legacy_names_expected_file(tmp_path):
    write(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz", np.zeros(SHAPE, np.float32))
    cohort = discover(tmp_path, strict=False)
    assert cohort.cases == []
    assert sorted(p.path.name for p in cohort.problems) == [
        "BraTS2021_00001_flair.nii.gz",
        "BraTS2021_00001_t1ce.nii.gz",
        "BraTS2021_00001_t2.nii.gz",
    ]


def test_shape_mismatch(tmp_path):
    folder = good_case(tmp_path)
    bad = write(folder / "BraTS-GLI-00000-000-t2f.nii.gz", np.zeros((8, 9, 11), np.float32))
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(info.value, bad, "shape (8, 9, 11) differs from BraTS-GLI-00000-000-t1n.nii.gz shape (8, 9, 10)")


def test_label_shape_mismatch(tmp_path):
    folder = good_case(tmp_path)
    bad = write(folder / "BraTS-GLI-00000-000-seg.nii.gz", np.zeros((8, 9, 9), np.uint8))
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(info.value, bad, "shape (8, 9, 9) differs from")


def test_affine_mismatch_beyond_tolerance(tmp_path):
    folder = good_case(tmp_path)
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    bad = write(folder / "BraTS-GLI-00000-000-t1c.nii.gz", np.zeros(SHAPE, np.float32), shifted)
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(
        info.value, bad, "affine differs from BraTS-GLI-00000-000-t1n.nii.gz by up to 0.5", "tolerance 0.001"
    )


def test_affine_within_tolerance_is_accepted(tmp_path):
    folder = good_case(tmp_path)
    nudged = np.eye(4)
    nudged[0, 3] = 4e-4
    write(folder / "BraTS-GLI-00000-000-t1c.nii.gz", np.ones(SHAPE, np.float32), nudged)
    assert load_case(only_case(tmp_path)).image.shape == (4, *SHAPE)


@pytest.mark.parametrize(
    "value, counts", [(np.nan, "1 NaN, 0 Inf"), (np.inf, "0 NaN, 1 Inf"), (-np.inf, "0 NaN, 1 Inf")]
)
def test_non_finite_voxels(tmp_path, value, counts):
    folder = good_case(tmp_path)
    image = np.zeros(SHAPE, np.float32)
    image[1, 2, 3] = value
    bad = write(folder / "BraTS-GLI-00000-000-t1n.nii.gz", image)
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(info.value, bad, f"1 non-finite voxels ({counts})")


def test_4d_where_3d_expected(tmp_path):
    folder = good_case(tmp_path)
    bad = write(folder / "BraTS-GLI-00000-000-t2w.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(info.value, bad, "expected a 3-D volume, got 4-D shape (8, 9, 10, 2)")


def test_msd_3d_image_where_4d_expected(tmp_path):
    bad = write(tmp_path / "imagesTr" / "BRATS_001.nii.gz", np.zeros(SHAPE, np.float32))
    case = only_case(tmp_path)
    with pytest.raises(DataError) as info:
        load_case(case)
    assert_problem(info.value, bad, "expected a 4-D multi-channel volume (X, Y, Z, C), got shape (8, 9, 10)")
    (problem,) = validate_case(case).problems
    assert_problem(problem, bad, "expected a 4-D")


def test_msd_too_few_channels(tmp_path):
    bad = write(tmp_path / "imagesTr" / "BRATS_001.nii.gz", np.zeros((*SHAPE, 3), np.float32))
    with pytest.raises(DataError) as info:
        load_case(only_case(tmp_path))
    assert_problem(info.value, bad, "expected 4 channels on the 4th axis")


def test_unknown_label_values_with_scheme(tmp_path):
    folder = good_case(tmp_path)
    seg = np.zeros(SHAPE, np.uint8)
    seg[1, 1, 1], seg[2, 2, 2] = 4, 7
    bad = write(folder / "BraTS-GLI-00000-000-seg.nii.gz", seg)
    case = only_case(tmp_path)
    assert load_case(case).label.max() == 7  # no scheme, no check
    with pytest.raises(DataError) as info:
        load_case(case, scheme="brats2023")
    assert_problem(info.value, bad, "unknown label values [4, 7] for scheme 'brats2023' (expected 0, 1, 2, 3)")


@pytest.mark.parametrize(
    "seg, fragment",
    [
        (np.full(SHAPE, 0.5, np.float32), "720 non-integer label voxels (e.g. 0.5)"),
        (np.full(SHAPE, 300, np.int16), "label values outside 0..255 (min 300, max 300)"),
        (np.full(SHAPE, -1, np.int16), "label values outside 0..255"),
        (np.full(SHAPE, np.nan, np.float32), "non-finite voxels"),
    ],
    ids=["fractional", "too-large", "negative", "nan"],
)
def test_bad_label_arrays(tmp_path, seg, fragment):
    folder = good_case(tmp_path)
    bad = write(folder / "BraTS-GLI-00000-000-seg.nii.gz", seg)
    case = only_case(tmp_path)
    with pytest.raises(DataError) as info:
        load_case(case)
    assert_problem(info.value, bad, fragment)
    (problem,) = validate_case(case).problems
    assert_problem(problem, bad, fragment)


def test_validate_case_collects_every_problem_of_a_case(tmp_path):
    folder = good_case(tmp_path)
    nan = np.zeros(SHAPE, np.float32)
    nan[0, 0, 0] = np.nan
    write(folder / "BraTS-GLI-00000-000-t1c.nii.gz", nan)
    truncate(folder / "BraTS-GLI-00000-000-t2f.nii.gz", 0.6)
    write(folder / "BraTS-GLI-00000-000-seg.nii.gz", np.full(SHAPE, 9, np.uint8))
    report = validate_case(only_case(tmp_path), scheme="brats2023")
    assert [p.path.name for p in report.problems] == [
        "BraTS-GLI-00000-000-t1c.nii.gz",
        "BraTS-GLI-00000-000-t2f.nii.gz",
        "BraTS-GLI-00000-000-seg.nii.gz",
    ]
    assert report.label_values == (9,)
    # header-only scan still finds geometry problems but not voxel ones
    assert [p.path.name for p in validate_case(only_case(tmp_path), read_voxels=False).problems] == []


# -- folders -------------------------------------------------------------------------------------------


def test_duplicate_case_id_in_two_folders(tmp_path):
    good_case(tmp_path / "a")
    good_case(tmp_path / "b")
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    dup = tmp_path / "b" / "BraTS-GLI-00000-000"
    assert_problem(
        info.value,
        dup / "BraTS-GLI-00000-000-seg.nii.gz",
        f"duplicate case id 'BraTS-GLI-00000-000': also in {tmp_path / 'a' / 'BraTS-GLI-00000-000'}",
    )
    cohort = discover(tmp_path, strict=False)
    assert len(cohort.cases) == 1 and len(cohort.problems) == 1


def test_duplicate_file_nii_and_nii_gz(tmp_path):
    folder = good_case(tmp_path)
    write(folder / "BraTS-GLI-00000-000-t1n.nii", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    # the first name in sorted order is kept
    dup = folder / "BraTS-GLI-00000-000-t1n.nii.gz"
    assert_problem(
        info.value, dup, "duplicate t1n file for case 'BraTS-GLI-00000-000': also BraTS-GLI-00000-000-t1n.nii"
    )


def test_msd_duplicate_and_orphan_label(tmp_path):
    image = np.zeros((*SHAPE, 4), np.float32)
    write(tmp_path / "imagesTr" / "BRATS_001.nii.gz", image)
    dup = write(tmp_path / "imagesTs" / "BRATS_001.nii.gz", image)
    orphan = write(tmp_path / "labelsTr" / "BRATS_002.nii.gz", np.zeros(SHAPE, np.uint8))
    cohort = discover(tmp_path, strict=False)
    assert [c.case_id for c in cohort.cases] == ["BRATS_001"]
    first, second = cohort.problems
    assert_problem(first, dup, "duplicate case id 'BRATS_001'")
    assert_problem(second, tmp_path / "imagesTr" / "BRATS_002.nii.gz", "missing image of case 'BRATS_002'", str(orphan))


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda root: None, "empty folder"),
        (lambda root: (root / "notes.txt").write_text("x"), "no .nii or .nii.gz files found"),
        (
            lambda root: write(root / "brain.nii.gz", np.zeros(SHAPE, np.float32)),
            "1 NIfTI files but none follows a supported naming convention (found brain.nii.gz)",
        ),
    ],
    ids=["empty", "no-nifti", "unknown-names"],
)
def test_nothing_found(tmp_path, setup, fragment):
    setup(tmp_path)
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    assert_problem(info.value, tmp_path, fragment)
    cohort = discover(tmp_path, strict=False)
    assert cohort.convention == "unknown" and cohort.cases == []
    assert_problem(cohort.problems[0], tmp_path, fragment)


def test_mixed_conventions(tmp_path):
    good_case(tmp_path)
    write(tmp_path / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(DataError) as info:
        discover(tmp_path)
    assert_problem(info.value, tmp_path, "mixed naming conventions (brats2023: 5 files", "brats2021: 1 files")
    cohort = discover(tmp_path, strict=False)  # goes on with the majority convention
    assert cohort.convention == "brats2023" and len(cohort.cases) == 1
    assert len(cohort.problems) == 1 and cohort.ignored[0].name == "BraTS2021_00001_t1.nii.gz"


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "nope", strict=False)


def test_unknown_convention_name(tmp_path):
    with pytest.raises(ValueError, match="unknown naming convention 'brats2022' .*did you mean"):
        discover(tmp_path, convention="brats2022")


# -- inspect reports every problem ----------------------------------------------------------------------


def build_bad_cohort(root: Path) -> dict[str, Path]:
    good_case(root, "BraTS-GLI-00000-000")
    f1 = good_case(root, "BraTS-GLI-00001-000")
    truncate(f1 / "BraTS-GLI-00001-000-t1n.nii.gz", 0.6)
    f2 = good_case(root, "BraTS-GLI-00002-000")
    nan = np.zeros(SHAPE, np.float32)
    nan[0, 0, 0] = np.nan
    write(f2 / "BraTS-GLI-00002-000-t2w.nii.gz", nan)
    f3 = good_case(root, "BraTS-GLI-00003-000")
    write(f3 / "BraTS-GLI-00003-000-seg.nii.gz", np.full(SHAPE, 6, np.uint8))
    f4 = good_case(root, "BraTS-GLI-00004-000")
    (f4 / "BraTS-GLI-00004-000-t1c.nii.gz").unlink()
    return {
        "truncated": f1 / "BraTS-GLI-00001-000-t1n.nii.gz",
        "nan": f2 / "BraTS-GLI-00002-000-t2w.nii.gz",
        "labels": f3 / "BraTS-GLI-00003-000-seg.nii.gz",
        "missing": f4 / "BraTS-GLI-00004-000-t1c.nii.gz",
    }


def test_inspect_lists_every_problem(tmp_path, capsys):
    bad = build_bad_cohort(tmp_path)
    assert main(["inspect", str(tmp_path), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "cases         4 (4 with labels, 0 without)" in out
    assert "problems      4" in out
    assert f"  - {bad['missing']}: missing modality t1c" in out
    assert f"  - {bad['truncated']}: cannot decode voxel data" in out
    assert f"  - {bad['nan']}: 1 non-finite voxels" in out
    assert f"  - {bad['labels']}: unknown label values [6] for scheme 'brats2023'" in out


def test_inspect_json_problems_and_quick_mode(tmp_path, capsys):
    bad = build_bad_cohort(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 1
    problems = {p["path"]: p["problem"] for p in json.loads(capsys.readouterr().out)["problems"]}
    assert set(problems) == {str(p) for p in bad.values()}
    # --quick skips decoding images: truncation and NaN go unseen, labels and naming are still checked
    assert main(["inspect", str(tmp_path), "--json", "--quick"]) == 1
    quick = {p["path"] for p in json.loads(capsys.readouterr().out)["problems"]}
    assert quick == {str(bad["labels"]), str(bad["missing"])}


def test_inspect_scheme_option(tmp_path, capsys):
    good_case(tmp_path)
    assert main(["inspect", str(tmp_path), "--scheme", "legacy"]) == 1
    assert "unknown label values [3] for scheme 'legacy'" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path), "--scheme", "legacyy"]) == 2
    assert "did you mean 'legacy'" in capsys.readouterr().err


def test_inspect_empty_folder_and_missing_folder(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "convention  unknown" in out or "convention    unknown" in out
    assert f"{tmp_path}: empty folder" in out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
