"""Selection across cross-validated configurations, from CV output folders to the deployed ensemble.

Two CV output folders share one fold plan (as two ``cross_validate`` runs with the same seed and
gate do); their out-of-fold probabilities are planted, not trained: ``cfg-good`` is close to the
truth, ``cfg-broken`` calls the whole crop tumour. Fold models are seeded tiny networks.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bratstune.errors import ConfigError
from bratstune.labels import get_scheme, labels_to_regions
from bratstune.search.crossval.decode_tuning import threshold_spec
from bratstune.search.crossval.ensemble_selection import (
    build_selected_ensemble,
    candidates_from_cv,
    crossfit_selection,
)
from bratstune.search.crossval.folds import plan_folds
from bratstune.training.checkpoint import save_best
from bratstune.training.config import load_train_config
from bratstune.training.network import build_network, resolve_config

CONFIG = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supervision": False}},
    "data": {"patch_size": [24, 24, 24], "num_workers": 0},
    "device": "cpu",
    "challenge": "GLI",
}


def _fake_cv(out, plan, kind: str) -> None:
    """A finished CV output folder: folds.json, gate.json, oof/, folds/fold<k>/{best_model, cases.json}."""
    out.mkdir(parents=True)
    plan.write(out)
    (out / "oof").mkdir()
    rng = np.random.default_rng(0 if kind == "good" else 1)
    for case in plan.prepared.cases:
        if case.case_id in plan.gate_ids:
            continue
        truth = labels_to_regions(np.asarray(case.label), plan.scheme).astype(np.float32)
        probs = 0.8 * truth + rng.uniform(0, 0.15, truth.shape) if kind == "good" else np.full(truth.shape, 0.9)
        np.save(out / "oof" / f"{case.case_id}.npy", probs.astype(np.float16))
    config = resolve_config(load_train_config(CONFIG))
    for k in range(plan.k):
        model = build_network(config, plan.scheme)
        save_best(out / "folds" / f"fold{k}" / "best_model", model=model, config=config.to_dict(), metrics={})
        plan.fold_record(k).write(out / "folds" / f"fold{k}" / "cases.json")


@pytest.fixture(scope="module")
def two_cvs(tmp_path_factory):
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("select")
    data = root / "data"
    generate_cohort(data, challenge="GLI", cases=8, shape=(32, 32, 24), anatomy="procedural", seed=2, workers=1)
    plan = plan_folds(
        load_train_config(CONFIG), data, k=3, gate_fraction=0.25, selection="fixed", cache_root=root / "cache"
    )
    for kind in ("good", "broken"):
        _fake_cv(root / f"cfg-{kind}", plan, kind)
    return root, data, plan


def test_selection_over_cv_outputs_deploys_only_the_good_configuration(two_cvs):
    root, data, plan = two_cvs
    dirs = [root / "cfg-broken", root / "cfg-good"]
    candidates, references = candidates_from_cv(dirs, data, cache_root=root / "cache")
    assert [c.name for c in candidates] == ["cfg-broken", "cfg-good"]
    assert [[c.case_id for c in fold] for fold in references] == plan.fold_ids
    scheme = get_scheme("brats2023")
    spec = threshold_spec(None, "GLI", 4)
    result = crossfit_selection(candidates, references, scheme, challenge="GLI", method="greedy", decode_spec=spec)
    assert result.selection.members == ["cfg-good"]
    assert all(s.members == ["cfg-good"] for s in result.fold_selections)
    assert sorted(result.case_metrics) == plan.cv_ids and result.oos["dice_lesion_mean"] > 0.5
    equal = crossfit_selection(candidates, references, scheme, challenge="GLI", method="equal")
    assert result.oos["dice_lesion_mean"] > equal.oos["dice_lesion_mean"]

    ensemble = build_selected_ensemble(result, candidates, scheme=scheme, challenge="GLI", gate=plan.gate_ids)
    assert [m.name for m in ensemble.members] == [f"cfg-good-fold{k}" for k in range(plan.k)]
    record = json.loads(ensemble.lineage["cases"])
    assert record["gate"] == sorted(plan.gate_ids) and record["tuned"] == plan.cv_ids
    assert not set(record["gate"]) & (set(record["trained"]) | set(record["tuned"]))
    assert ensemble.metrics["cv/oos/dice_lesion_mean"] == pytest.approx(result.oos["dice_lesion_mean"])
    assert json.loads(ensemble.lineage["selection"])["weights"] == result.selection.weights


def test_cv_outputs_on_different_folds_are_refused(two_cvs, tmp_path):
    root, data, plan = two_cvs
    other = tmp_path / "cfg-other"
    other.mkdir()
    (other / "folds.json").write_text(json.dumps({"fold0": plan.fold_ids[1], "fold1": plan.fold_ids[0]}))
    (other / "gate.json").write_text(json.dumps({"gate": plan.gate_ids}))
    with pytest.raises(ConfigError, match="folds or gate split differ"):
        candidates_from_cv([root / "cfg-good", other], data, cache_root=root / "cache")
