"""Held out means held out: a fold's epoch choice and decode settings never use that fold's cases.

Two planted-case tests, no Ray:

* epoch choice: two copies of one cohort cut by the same splits file, differing only in the label
  of one case that fold 0 holds out. A stand-in ``fit`` chooses its epoch from the labels of the
  validation cases it is given; on the held-out cases that choice *does* change with the planted
  label, yet fold 0's choice through the CV stages is the same in both cohorts (and the recorded
  case lists keep the held-out case out of its training and selection);
* decode settings: out-of-fold probabilities in three folds, one planted case in fold 0 whose
  weak tumour pulls the tuned threshold down: it changes the deployed threshold (tuned on every
  fold) but not fold 0's cross-fitted one (tuned on folds 1 and 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bratstune.data.layout import discover
from bratstune.labels import get_scheme, labels_to_regions
from bratstune.search.crossval.crossfit import per_case
from bratstune.search.crossval.decode_tuning import crossfit_decode
from bratstune.search.crossval.fold_trials import _fit_and_keep
from bratstune.search.crossval.folds import plan_folds
from bratstune.search.threshold_space import parse_threshold_space
from bratstune.search.thresholds import CachedCase, search_thresholds
from bratstune.training.checkpoint import save_best
from bratstune.training.config import load_train_config
from bratstune.training.network import build_network, resolve_config
from bratstune.training.report import FitResult

SCHEME = get_scheme("brats2023")
CONFIG = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supervision": False}},
    "data": {"patch_size": [24, 24, 24], "batch_size": 2, "num_workers": 0},
    "epochs": 3,
    "steps_per_epoch": 1,
    "device": "cpu",
    "amp": "off",
    "challenge": "GLI",
}


def _tumour_voxels(cases) -> int:
    return int(sum(np.count_nonzero(np.asarray(c.label)) for c in cases))


def _epoch_from(cases, epochs: int = 3) -> int:
    """The stand-in selection rule: an epoch that depends on the labels it is shown."""
    return 1 + _tumour_voxels(cases) % epochs


def _stub_fit(config, data, reporter=None, *, out_dir, **_):
    """A ``fit`` that 'selects' its epoch on ``data.val`` and saves an untrained tiny network."""
    resolved = resolve_config(load_train_config(config))
    model = build_network(resolved, data.scheme).eval()
    epoch = _epoch_from(data.val)
    best = save_best(Path(out_dir) / "best", model=model, config=resolved.to_dict(), metrics={"val/epoch": epoch})
    return FitResult(resolved, model, 0.0, epoch, {"epoch": float(epoch)}, [], Path(out_dir), best, None, 3)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """Cohort A, and B = A with the label of one case enlarged; one splits file and gate for both."""
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("leak")
    a = root / "A"
    generate_cohort(a, challenge="GLI", cases=8, shape=(32, 32, 24), anatomy="procedural", seed=5, workers=1)
    ids = sorted(c.case_id for c in discover(a).cases)
    gate, cv = ids[:2], ids[2:]
    folds = [cv[0:2], cv[2:4], cv[4:6]]
    splits = [{"train": [c for j, f in enumerate(folds) if j != k for c in f], "val": f} for k, f in enumerate(folds)]
    (root / "splits.json").write_text(json.dumps(splits))
    (root / "gate.json").write_text(json.dumps(gate))
    planted = folds[0][0]
    b = root / "B"
    shutil.copytree(a, b)
    seg = next(p for p in b.rglob(f"{planted}-seg.nii.gz"))
    image = nib.load(seg)
    label = np.asarray(image.dataobj).astype(np.uint8)
    grown = label.copy()
    grown[4:28, 4:28, 4:20] = np.where(label[4:28, 4:28, 4:20] == 0, 2, label[4:28, 4:28, 4:20])  # more oedema
    nib.save(nib.Nifti1Image(grown, image.affine, image.header), seg)
    return {"A": a, "B": b, "splits": root / "splits.json", "gate": root / "gate.json", "planted": planted}


def _plan(root, cohorts, tmp_path, selection="inner"):
    return plan_folds(
        load_train_config(CONFIG),
        root,
        k=3,
        splits=cohorts["splits"],
        gate_cases=cohorts["gate"],
        selection=selection,
        inner_val_fraction=0.5,
        cache_root=tmp_path / "cache",
    )


def test_a_folds_epoch_choice_never_sees_its_held_out_cases(cohorts, tmp_path):
    chosen, leaky = {}, {}
    for name in ("A", "B"):
        plan = _plan(cohorts[name], cohorts, tmp_path)
        assert plan.fold_ids[0][0] == cohorts["planted"] and plan.gate_ids == json.loads(cohorts["gate"].read_text())
        for k in range(plan.k):
            record = plan.fold_record(k)
            held = set(record.extra["held_out"])
            assert not held & (set(record.trained) | set(record.selected)), k
            assert not set(plan.gate_ids) & (set(record.trained) | set(record.selected) | held)
            assert sorted(set(record.trained) | set(record.selected) | held) == plan.cv_ids
            assert record.selected  # selection: inner chooses on some of its own training cases
        data = plan.handles[0].load()
        result = _fit_and_keep(
            load_train_config(CONFIG),
            data,
            None,
            out_dir=tmp_path / name / "fit",
            fold=0,
            cv_dir=str(tmp_path / name / "cv"),
            held_out=plan.held_out_handles[0],
            selection="inner",
            fit_fn=_stub_fit,
        )
        chosen[name] = result.best_epoch
        leaky[name] = _epoch_from(plan.held_out_cases(0))  # what choosing on the held-out fold would give
        oof = json.loads((tmp_path / name / "cv" / "folds" / "fold0" / "oof_cases.json").read_text())
        assert oof == plan.fold_ids[0]  # the OOF probabilities are the held-out cases'
    assert leaky["A"] != leaky["B"]  # the planted label would change a choice made on the held-out fold ...
    assert chosen["A"] == chosen["B"]  # ... and does not change fold 0's actual choice


def test_fixed_selection_uses_no_case_to_choose_an_epoch(cohorts, tmp_path):
    plan = _plan(cohorts["A"], cohorts, tmp_path, selection="fixed")
    for k in range(plan.k):
        record = plan.fold_record(k)
        assert record.selected == [] and plan.handles[k].val_cases == []
        assert sorted(set(record.trained) | set(record.extra["held_out"])) == plan.cv_ids


def _oof_case(case_id: str, seed: int, *, weak: bool = False) -> CachedCase:
    """OOF probabilities of one case: a clear tumour with a 0.45 halo (tune WT high), or a weak one (tune low)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((24, 24, 16), dtype=np.uint8)
    label[6:18, 6:18, 4:12] = 2
    label[9:15, 9:15, 6:10] = 1
    label[10:14, 10:14, 7:9] = 3
    regions = labels_to_regions(label, SCHEME).astype(np.float32)
    probs = 0.05 + 0.85 * regions
    if weak:
        probs[0] = np.where(regions[0] > 0, 0.4, 0.05)  # WT present but faint: only a low threshold finds it
    else:
        probs[0, 3:21, 3:21, 2:14] = np.maximum(probs[0, 3:21, 3:21, 2:14], 0.45)  # halo: a low threshold over-segments
    probs += rng.uniform(0, 0.02, probs.shape)
    return CachedCase(case_id, np.clip(probs, 0, 1).astype(np.float16), label, (1.0, 1.0, 1.0))


def test_a_folds_decode_settings_never_see_its_held_out_cases():
    space = parse_threshold_space(
        {
            "kind": "thresholds",
            "metric": "dice_lesion_mean",
            "num_samples": 6,
            "search": {"algorithm": "random", "seed": 0},
            "params": {"thresholds.WT": {"distribution": "categorical", "choices": [0.3, 0.6]}},
        }
    )
    folds = [[_oof_case("f0a", 0), _oof_case("f0b", 1)], [_oof_case("f1a", 2)], [_oof_case("f2a", 3)]]
    planted = [[_oof_case("f0a", 0), _oof_case("f0b", 1, weak=True)], folds[1], folds[2]]

    def deployed(by_fold):
        cases = [c for fold in by_fold for c in fold]
        return search_thresholds(space, cases, SCHEME, challenge="GLI").best.thresholds["WT"]

    clean_settings, clean_cases, _ = crossfit_decode(folds, SCHEME, space, challenge="GLI")
    plant_settings, plant_cases, _ = crossfit_decode(planted, SCHEME, space, challenge="GLI")
    assert deployed(folds) == 0.6 and deployed(planted) == 0.3  # the plant moves a choice that sees it ...
    assert clean_settings[0] == plant_settings[0]  # ... but not fold 0's, tuned on folds 1 and 2 only
    assert clean_settings[0].thresholds["WT"] == 0.6
    assert plant_settings[1].thresholds["WT"] == 0.3  # fold 1's settings do see fold 0's planted case
    # each case is scored once, with its own fold's settings
    assert sorted(plant_cases) == ["f0a", "f0b", "f1a", "f2a"]
    again = per_case(planted[0], SCHEME, plant_settings[0], challenge="GLI")
    assert plant_cases["f0b"] == again["f0b"]


def test_a_separate_folder_can_be_the_gate_split(cohorts, tmp_path):
    from bratstune.data.synthetic import generate_cohort
    from bratstune.errors import DataError

    gate = tmp_path / "gate"
    generate_cohort(gate, challenge="GLI", cases=2, shape=(32, 32, 24), anatomy="procedural", seed=9, start_index=100)
    plan = plan_folds(
        load_train_config(CONFIG), cohorts["A"], k=3, gate_data=gate, selection="fixed", cache_root=tmp_path / "c"
    )
    assert plan.gate_ids == sorted(c.case_id for c in discover(gate).cases) and plan.gate_root == gate.resolve()
    assert len(plan.cv_ids) == 8  # the whole cohort is cross-validated
    with pytest.raises(DataError, match="also in the cross-validated cohort"):
        plan_folds(load_train_config(CONFIG), cohorts["A"], k=3, gate_data=cohorts["B"], cache_root=tmp_path / "c")


def test_fixed_selection_keeps_the_last_weights_of_a_real_fit(cohorts, tmp_path):
    plan = _plan(cohorts["A"], cohorts, tmp_path, selection="fixed")
    config = load_train_config({**CONFIG, "epochs": 1, "steps_per_epoch": 1, "num_threads": 1})
    result = _fit_and_keep(
        config,
        plan.handles[1].load(),
        None,
        out_dir=tmp_path / "fit",
        fold=1,
        cv_dir=str(tmp_path / "cv"),
        held_out=plan.held_out_handles[1],
        selection="fixed",
    )
    assert result.best_dir is None and result.best_epoch is None  # nothing chose an epoch
    best = tmp_path / "cv" / "folds" / "fold1" / "best_model"
    assert (best / "model.pt").is_file() and (best / "config.yaml").is_file()
    assert sorted(p.stem for p in (tmp_path / "cv" / "oof").glob("*.npy")) == sorted(plan.fold_ids[1])
