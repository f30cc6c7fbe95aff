"""``data.label_dust``: training targets lose exactly the lesions the official definition calls small."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from bratstune.data.fingerprint import data_fingerprint
from bratstune.errors import ConfigError
from bratstune.labels import get_scheme
from bratstune.metrics import lesion_wise
from bratstune.metrics.small_lesions import official_min_volume, small_lesions
from bratstune.training.config import load_train_config
from bratstune.training.label_dust import apply_label_dust, remove_label_dust

SCHEME = get_scheme("brats2023")


def hand_built() -> np.ndarray:
    """Five GLI lesions on a 1-mm grid (threshold 50 mm³, dilation 3)."""
    seg = np.zeros((48, 48, 48), dtype=np.uint8)
    # A: a large tumour (ED 7^3) with a 4^3 necrotic core (64 voxels: a kept TC lesion) holding a
    #    2^3 enhancing spot (8 voxels: a small ET lesion -> it becomes core)
    seg[2:9, 2:9, 2:9] = 2
    seg[3:7, 3:7, 3:7] = 1
    seg[4:6, 4:6, 4:6] = 3
    # B: an isolated 3^3 edema blob (27 mm³): small -> background
    seg[30:33, 2:5, 2:5] = 2
    # C: two 3^3 blobs (27 voxels each) two voxels apart: one dilation-merged lesion of 54 mm³ -> kept,
    #    although each blob on its own is below the threshold
    seg[2:5, 30:33, 2:5] = 2
    seg[7:10, 30:33, 2:5] = 2
    # D: exactly 50 voxels: "<= 50 mm³" is small -> background
    seg[30:35, 30:35, 30:32] = 2
    # E: 51 voxels (D plus one): kept
    seg[15:20, 40:45, 40:42] = 2
    seg[15, 40, 42] = 2
    return seg


def test_the_official_definition_decides_which_lesions_go():
    seg = hand_built()
    out, changed = remove_label_dust(seg, SCHEME, challenge="GLI", protocol="brats2023", spacing=(1, 1, 1))

    expected = seg.copy()
    expected[4:6, 4:6, 4:6] = 1  # A's enhancing spot becomes core; A's core and edema stay
    expected[30:33, 2:5, 2:5] = 0  # B
    expected[30:35, 30:35, 30:32] = 0  # D
    np.testing.assert_array_equal(out, expected)
    assert changed == 8 + 27 + 50

    # the same lesions the evaluation leaves out of its averages ("counted" false), region by region
    evaluation = lesion_wise(seg, seg, "GLI", "brats2023", spacing=(1, 1, 1), lesions=True)
    for region, values in SCHEME.regions.items():
        left_out = sum(row["voxels"] for row in evaluation[region]["lesions"] if not row["counted"])
        removed = int(np.count_nonzero(np.isin(seg, values) & ~np.isin(out, values)))
        assert removed == left_out, region
    # plain connected components would have called both blobs of C small
    assert small_lesions(seg > 0, "GLI", "brats2026", min_volume=50.0)[2:5, 30:33, 2:5].all()
    assert not small_lesions(seg > 0, "GLI", "brats2023")[2:5, 30:33, 2:5].any()


def test_spacing_and_threshold_are_in_mm3():
    seg = hand_built()
    out, changed = remove_label_dust(seg, SCHEME, spacing=(2, 2, 2))  # every lesion is >= 64 mm³ now
    assert changed == 0 and out is seg
    out, _ = remove_label_dust(seg, SCHEME, spacing=(1, 1, 1), min_volume=60.0)
    assert not out[2:10, 30:33, 2:5].any()  # C (54 mm³) is small under a 60 mm³ threshold
    assert official_min_volume("MET") == 2.0 and official_min_volume("GLI", "brats2026") is None


@dataclass
class Case:
    label: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)


def test_the_option_is_off_by_default_recorded_in_the_fingerprint_and_checked():
    cases = [Case(hand_built())]
    off = load_train_config({})
    assert off.data.label_dust.enabled is False
    assert apply_label_dust(off, cases, SCHEME)[0] is cases[0]
    on = load_train_config({"data": {"label_dust": {"enabled": True}}, "challenge": "GLI"})
    cleaned = apply_label_dust(on, cases, SCHEME)[0]
    assert cleaned is not cases[0] and not cleaned.label[30:33, 2:5, 2:5].any()
    assert cases[0].label[30:33, 2:5, 2:5].all()  # the cached label itself is untouched

    ids = ["a", "b"]
    assert data_fingerprint(ids, None, label_dust=off.data.label_dust) == data_fingerprint(ids, None)
    assert data_fingerprint(ids, None, label_dust=on.data.label_dust) != data_fingerprint(ids, None)
    with pytest.raises(ConfigError, match="data.label_dust.min_volume"):
        load_train_config({"data": {"label_dust": {"enabled": True}}, "validation": {"protocol": "brats2026"}})
    with pytest.raises(ConfigError, match="data.label_dust.min_volume"):
        load_train_config({"data": {"label_dust": {"enabled": True, "min_volume": -1}}})
