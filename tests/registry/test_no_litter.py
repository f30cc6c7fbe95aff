"""A ``models:/`` prediction (one batch, or ``--watch`` polls) leaves nothing in the temp folder.

The model download lives in a hidden scratch folder inside the output folder for the length of
the batch; a scratch folder left by a killed run is removed by the next run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pytest

from .conftest import make_ensemble

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


def _bratstune_entries() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("bratstune-")}


def test_models_uri_prediction_and_watch_leave_no_model_copy(mlflow_store, tmp_path):
    from bratstune.data.synthetic import generate_cohort
    from bratstune.ensemble.registry import register_ensemble
    from bratstune.predict.batch import WORK_PREFIX, predict_cohort, watch
    from bratstune.tracking.runs import setup_mlflow, start_run

    name = "bratstune-litter"
    with start_run(run_name="register", experiment_id=setup_mlflow("litter-test")):
        version = str(register_ensemble(make_ensemble(seeds=(0,)), name=name, metric="val/dice_mean").version)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    cohort = tmp_path / "cohort"
    generate_cohort(cohort, challenge="GLI", cases=1, shape=(32, 32, 32), anatomy="procedural", seed=5, workers=1)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{WORK_PREFIX}999999999-left-by-a-killed-run"  # no such process
    (stale / "model").mkdir(parents=True)
    before = _bratstune_entries()
    options = {"experiment": None, "thumbnails": False, "progress": False}
    summary = predict_cohort(cohort, f"models:/{name}@champion", out, **options)
    assert summary.ok and len(summary.predicted) == 1
    assert not stale.exists(), "the killed run's scratch folder was not removed"
    assert not list(out.glob(f"{WORK_PREFIX}*")), "this run's scratch folder was left in the output folder"
    polls = watch(
        cohort, f"models:/{name}/{version}", tmp_path / "out-watch", interval=0.0, max_polls=2, settle_s=0.0, **options
    )
    assert len(polls) == 2 and polls[0].predicted and not polls[1].predicted  # the second poll has nothing new
    assert not list((tmp_path / "out-watch").glob(f"{WORK_PREFIX}*"))
    assert _bratstune_entries() == before, "a model copy was left in the temp folder"
