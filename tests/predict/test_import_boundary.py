"""Prediction never loads the training loop: a fresh interpreter predicts with a saved ensemble.

The import-linter contract checks the static import graph; this test checks what a real
prediction process has in ``sys.modules`` after ``import bratstune.predict``, loading an ensemble
package and segmenting a case with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

TINY = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
    "data": {"patch_size": [24, 24, 24]},
    "challenge": "GLI",
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import bratstune.predict
    from bratstune.data.case import load_case
    from bratstune.data.layout import discover
    from bratstune.ensemble.registry import load_ensemble

    folder, cohort, out = map(Path, sys.argv[1:4])
    loaded = load_ensemble(folder)
    case = discover(cohort).cases[0]
    data = load_case(case)
    seg = loaded.ensemble.segment(data)
    summary = bratstune.predict.predict_cohort(cohort, loaded, out, experiment=None, progress=False, thumbnails=False)
    print(json.dumps({
        "labels_shape": list(seg.labels.shape),
        "labels_dtype": str(seg.labels.dtype),
        "image_shape": list(data.image.shape),
        "predicted": summary.predicted,
        "training": sorted(m for m in sys.modules if m == "bratstune.training" or m.startswith("bratstune.training.")),
    }))
    """
)


def _save_tiny_ensemble(folder: Path) -> Path:
    from bratstune.ensemble.member import Member
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig
    from bratstune.labels import scheme_for
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    config = resolve_config(load_train_config(TINY))
    torch.manual_seed(0)
    model = build_network(config, scheme_for("GLI")).eval()
    ensemble = Ensemble.from_members(
        [Member("seed0", config, model)],
        scheme="brats2023",
        challenge="GLI",
        inference=InferenceConfig(overlap=0.25, flips=False),
        metrics={"val/dice_mean": 0.5},
    )
    return ensemble.save(folder)


def test_predict_process_never_imports_training(tmp_path):
    from bratstune.data.synthetic import generate_cohort

    folder = _save_tiny_ensemble(tmp_path / "ensemble")
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, challenge="GLI", cases=1, shape=(32, 32, 32), anatomy="procedural", seed=2, workers=1)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(cohort), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["training"] == []
    assert result["labels_shape"] == result["image_shape"][1:] == [32, 32, 32]
    assert result["labels_dtype"] == "uint8"
    assert len(result["predicted"]) == 1
