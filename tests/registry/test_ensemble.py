"""Ensemble packaging: TTA views, save/load round trip, manifest integrity, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bratstune.ensemble.manifest import IntegrityError
from bratstune.ensemble.package import Ensemble
from bratstune.errors import ConfigError
from bratstune.inference.sliding_window import InferenceConfig, probabilities_on_grid
from bratstune.inference.views import apply_view, invert_view, tta_views

from .conftest import make_ensemble, make_member  # noqa: F401  (importlib mode: package-relative)


@pytest.mark.parametrize(
    "flips, rotate, count", [(False, False, 1), (True, False, 8), (True, True, 10), (False, True, 3)]
)
def test_tta_view_count(flips, rotate, count):
    views = tta_views(flips=flips, rotate90=rotate)
    assert len(views) == count and views[0].flips == () and views[0].k == 0
    assert len({v.name for v in views}) == count


@pytest.mark.parametrize("view", tta_views(flips=True, rotate90=True), ids=lambda v: v.name)
def test_view_inverts(view):
    x = torch.arange(2 * 3 * 5 * 4 * 6, dtype=torch.float32).reshape(2, 3, 5, 4, 6)
    assert torch.equal(invert_view(apply_view(x, view), view), x)


def test_inference_config_validates():
    with pytest.raises(ConfigError, match="overlap"):
        InferenceConfig(overlap=1.0)
    with pytest.raises(ConfigError, match="blend"):
        InferenceConfig(blend="median")
    assert InferenceConfig(roi_size=32).roi_size == (32, 32, 32)


def test_probabilities_on_grid_fills_outside():
    probs = np.full((3, 2, 2, 2), 0.9, dtype=np.float32)
    bbox = (slice(1, 3), slice(0, 2), slice(2, 4))
    out = probabilities_on_grid(probs, bbox, (4, 4, 4), mode="region")
    assert out.shape == (3, 4, 4, 4) and out.sum() == pytest.approx(0.9 * 24)
    label = probabilities_on_grid(probs, bbox, (4, 4, 4), mode="label")
    assert label[0, 0, 3, 0] == 1.0 and label[1, 0, 3, 0] == 0.0


def test_save_load_round_trip_is_bit_exact(tmp_path, raw_case):
    _, data = raw_case
    ensemble = make_ensemble(thresholds={"ET": 0.4}, postprocess={"min_size": {"ET": 3}})
    before = ensemble.segment(data)
    folder = ensemble.save(tmp_path / "pkg")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["ensemble.json", "manifest.json", "members/00-seed0.safetensors", "members/01-seed1.safetensors"]
    loaded = Ensemble.load(folder)
    assert loaded.digest == ensemble.digest
    assert loaded.thresholds == {"WT": 0.5, "TC": 0.5, "ET": 0.4}
    assert loaded.postprocess.min_size == {"ET": 3}
    assert loaded.inference == ensemble.inference and loaded.modalities == ensemble.modalities
    after = loaded.segment(data)
    assert np.array_equal(before.labels, after.labels)
    pre = __import__("bratstune.data.preprocess", fromlist=["x"]).preprocess_case(data, loaded.preprocess)
    assert torch.equal(ensemble.probabilities(pre.image), loaded.probabilities(pre.image))
    # weights are plain safetensors (no pickle), the config plain JSON
    meta = json.loads((folder / "ensemble.json").read_text())
    assert meta["scheme"] == "brats2023" and meta["mode"] == "region" and len(meta["members"]) == 2


def test_output_geometry_and_decode(raw_case):
    _, data = raw_case
    seg = make_ensemble(seeds=(2,)).segment(data)
    assert seg.labels.shape == data.image.shape[1:] and seg.labels.dtype == np.uint8
    assert set(np.unique(seg.labels)) <= {0, 1, 2, 3}
    assert set(seg.timings) == {"preprocess", "network", "postprocess"}


def test_tampered_weight_file_is_refused(tmp_path):
    folder = make_ensemble(seeds=(0,)).save(tmp_path / "pkg")
    weights = folder / "members" / "00-seed0.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF  # one flipped byte inside a tensor
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"00-seed0\.safetensors: SHA-256 mismatch") as info:
        Ensemble.load(folder)
    assert info.value.path == weights


def test_missing_and_extra_files_are_refused(tmp_path):
    folder = make_ensemble(seeds=(0,)).save(tmp_path / "pkg")
    (folder / "members" / "evil.py").write_text("print('hi')")
    with pytest.raises(IntegrityError, match="evil.py: not listed"):
        Ensemble.load(folder)
    (folder / "members" / "evil.py").unlink()
    (folder / "members" / "00-seed0.safetensors").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        Ensemble.load(folder)


def test_edited_config_is_refused(tmp_path):
    folder = make_ensemble(seeds=(0,)).save(tmp_path / "pkg")
    meta = json.loads((folder / "ensemble.json").read_text())
    meta["thresholds"]["ET"] = 0.01
    (folder / "ensemble.json").write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="ensemble.json"):
        Ensemble.load(folder)


def test_from_members_validates():
    from dataclasses import replace

    a = make_member(0)
    b = make_member(1)
    b = replace(b, config={**b.config, "loss": {**b.config["loss"], "mode": "label"}})
    assert b.spec.mode == "label"
    with pytest.raises(ConfigError, match="output modes"):
        Ensemble.from_members([a, b], scheme="brats2023")
    with pytest.raises(ConfigError, match="unknown region"):
        Ensemble.from_members([a], scheme="brats2023", thresholds={"XX": 0.3})
    with pytest.raises(ConfigError, match="at least one"):
        Ensemble.from_members([], scheme="brats2023")


def test_drift_flags():
    from bratstune.data.fingerprint import training_fingerprint
    from bratstune.predict.drift import check_drift

    def fp(scale=1.0, orientation=("R", "A", "S"), spacing=(1.0, 1.0, 1.0)):
        return {
            "shape": [240, 240, 155],
            "spacing": list(spacing),
            "orientation": list(orientation),
            "intensity": {"t1n": {"p1": 10 * scale, "p50": 100 * scale, "p99": 300 * scale}},
        }

    reference = training_fingerprint([fp(1.0), fp(1.1), fp(0.9)])
    assert check_drift(fp(1.05), reference) == []
    flags = check_drift(fp(20.0, orientation=("L", "P", "S"), spacing=(2.0, 2.0, 2.0)), reference)
    assert any("orientation LPS" in f for f in flags)
    assert any(f.startswith("spacing 2x2x2") for f in flags)
    assert any(f.startswith("t1n intensity") for f in flags)
