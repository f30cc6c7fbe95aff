"""Hand-made tables for `bratstune.inference.postprocess`: dust removal, hole filling and their order."""

from __future__ import annotations

import numpy as np
import pytest

from bratstune.errors import ConfigError
from bratstune.inference.postprocess import PostprocessConfig, fill_holes, postprocess, remove_dust
from bratstune.labels import get_scheme

SCHEME = get_scheme("brats2023")  # 1 NCR, 2 ED, 3 ET; decode WT(2) > TC(1) > ET(3)


def tumour():
    seg = np.zeros((30, 30, 30), np.uint8)
    seg[5:25, 5:25, 5:25] = 2  # ED
    seg[9:21, 9:21, 9:21] = 1  # NCR
    seg[12:18, 12:18, 12:18] = 3  # ET
    return seg


def test_remove_dust_drops_small_components_only():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[1:4, 1:4, 1:4] = 3  # 27 voxels
    seg[8, 8, 8] = 3  # 1 voxel
    removed = remove_dust(seg, seg == 3, min_size=2)
    assert removed == 1 and seg[8, 8, 8] == 0 and (seg == 3).sum() == 27


def test_fill_holes_only_enclosed_background():
    seg = np.zeros((9, 9, 9), np.uint8)
    seg[1:8, 1:8, 1:8] = 1
    seg[4, 4, 4] = 0  # enclosed hole
    seg[1, 4, 4] = 0  # dent open to the outside through its face: not a hole
    filled = fill_holes(seg, seg == 1, 1)
    assert filled == 1 and seg[4, 4, 4] == 1 and seg[1, 4, 4] == 0


def test_fill_holes_ignores_background_that_touches_other_labels():
    seg = np.zeros((9, 9, 9), np.uint8)
    seg[1:8, 1:8, 1:8] = 1
    seg[3:6, 3:6, 3:6] = 2  # another label inside
    seg[4, 4, 4] = 0  # background enclosed by label 2, not by label 1
    assert fill_holes(seg, seg == 1, 1) == 0


def test_et_dust_inside_tc_becomes_ncr():
    seg = tumour()
    seg[10, 10, 10] = 3  # one ET voxel inside NCR
    out = postprocess(seg, SCHEME, {"min_size": {"ET": 5}})
    assert out[10, 10, 10] == 1  # removed, then filled as NCR (hole of TC)
    assert (out == 3).sum() == 216  # the real ET stays


def test_tc_dust_inside_wt_becomes_ed():
    seg = tumour()
    seg[6, 6, 6] = 1  # NCR speck inside the oedema
    out = postprocess(seg, SCHEME, {"min_size": {"TC": 5}})
    assert out[6, 6, 6] == 2


def test_wt_dust_removed_and_nothing_else_changes():
    seg = tumour()
    seg[27, 27, 27] = 2
    seg[0, 0, 0] = 3  # ET speck alone in the background
    out = postprocess(seg, SCHEME, PostprocessConfig(min_size={"ET": 5, "TC": 5, "WT": 5}))
    assert out[27, 27, 27] == 0 and out[0, 0, 0] == 0
    assert np.array_equal(out, tumour())


def test_default_config_keeps_dust_and_fills_holes():
    seg = tumour()
    seg[27, 27, 27] = 2
    seg[15, 15, 15] = 0  # hole in ET: ET has no decode child, the TC step fills it as NCR
    out = postprocess(seg, SCHEME)
    assert out[27, 27, 27] == 2 and out[15, 15, 15] == 1


def test_input_not_modified_and_dtype_kept():
    seg = tumour().astype(np.int16)
    seg[27, 27, 27] = 2
    before = seg.copy()
    out = postprocess(seg, "brats2023", {"min_size_WT": 2})
    assert np.array_equal(seg, before) and out.dtype == np.int16 and out[27, 27, 27] == 0


@pytest.mark.parametrize("mapping", [{"min_size": {"XX": 3}}, {"minsize": 3}, {"min_size": {"ET": -1}}])
def test_bad_config(mapping):
    with pytest.raises(ConfigError):
        postprocess(tumour(), SCHEME, mapping)


def test_flat_and_nested_keys_agree():
    a = PostprocessConfig.from_mapping({"min_size_ET": 3, "fill_holes_TC": False})
    b = PostprocessConfig.from_mapping({"min_size": {"ET": 3}, "fill_holes": {"TC": False}})
    assert a == b and not a.fills("TC") and a.fills("WT")
