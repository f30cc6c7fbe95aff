"""``search_spaces/preprocessing.yaml``: variants cached once before the trials, picked by name, carried into the package.

A real smoke search (local Ray, SQLite MLflow): its two trials train on two different cached
variants (one of them histogram-matched to the cohort, with label dust removal), no trial adds a
cache entry, each child run records its variant's fingerprint, and an ensemble of a trial's best
model preprocesses a raw case exactly as the cache entry that trial trained on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.mlflow]

ROOT = Path(__file__).resolve().parents[2]
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture()
def local_ray(monkeypatch):
    import ray

    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    temp_dir = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # short: Ray's socket paths are length-limited
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _entries(cache: Path) -> set[str]:
    return {p.name for p in (cache / "entries").glob("*/*")}


def test_trials_pick_cached_variants_and_the_package_applies_them(local_ray, tmp_path):
    from mlflow.tracking import MlflowClient

    from bratstune.config_utils import load_yaml
    from bratstune.data.cache import CaseCache
    from bratstune.data.case import load_case
    from bratstune.data.layout import discover
    from bratstune.data.preprocess import preprocess_case
    from bratstune.ensemble.member import Member
    from bratstune.ensemble.package import Ensemble
    from bratstune.search.data import prepare_data, synthetic_cohort
    from bratstune.search.space import load_search_space
    from bratstune.search.tune import run_search
    from bratstune.tracking import runs as tracking
    from bratstune.training.config import load_train_config

    spec = load_search_space(ROOT / "search_spaces" / "preprocessing.yaml").smoke_variant()
    cohort = synthetic_cohort(cases=6, shape=(40, 40, 32), root=tmp_path / "data")
    cache_root = tmp_path / "cache"
    os.environ["BRATSTUNE_CACHE"] = str(cache_root)  # the ensemble finds the cohort reference here
    data = prepare_data(spec, cohort, cache_root=cache_root)
    assert sorted(data.variants) == ["none", "zscore", "zscore_rescale", "zscore_rescale_histmatch"]
    before = _entries(cache_root)
    assert len(before) == 4 * 6  # four distinct variants x six cases, all cached before the first trial

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = tracking.setup_mlflow("preprocessing", uri=uri)
    outcome = run_search(
        spec, data, storage_path=tmp_path / "results", tracking_uri=uri, experiment_id=experiment_id, verbose=0
    )
    assert _entries(cache_root) == before  # no trial preprocessed anything
    client = MlflowClient(uri)
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    by_variant = {r.data.params["search.data.variant"]: r for r in children}
    assert len(by_variant) == 2, "the smoke search (seed 1) samples two different variants"

    cases = {c.case_id: c for c in discover(cohort).cases}
    for name, run in by_variant.items():
        handle, config = data.for_trial(
            load_train_config(load_yaml(client.download_artifacts(run.info.run_id, "config.yaml")))
        )
        assert config.data.variant == name
        assert run.data.tags["data.fingerprint"] == handle.fingerprint
        best = Path(client.download_artifacts(run.info.run_id, "best_model", str(tmp_path / name)))
        member = Member.from_folder(best, data.scheme)
        assert member.config["data"]["preprocess"]["normalize"] == handle.preprocess.normalize
        ensemble = Ensemble.from_members([member], scheme=data.scheme, challenge="GLI")
        assert ensemble.preprocess == handle.preprocess  # the variant travelled with the model
        assert (ensemble.reference is not None) == (handle.preprocess.histogram_match == "cohort")
        case = cases[data.val_ids[0]]
        raw = preprocess_case(load_case(case), ensemble.preprocess, reference=ensemble.reference)
        trained_on = CaseCache(cache_root).lookup(case, handle.preprocess)
        np.testing.assert_allclose(raw.image, trained_on.image, atol=1e-5)  # what prediction feeds the net
        assert ensemble.segment(load_case(case)).labels.shape == load_case(case).image.shape[1:]
    assert len({r.data.tags["data.fingerprint"] for r in children}) == 2
    dusty = [load_train_config(load_yaml(client.download_artifacts(r.info.run_id, "config.yaml"))) for r in children]
    assert {c.data.label_dust.enabled for c in dusty} == {True, False}
