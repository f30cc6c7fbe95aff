"""Batch prediction with two Ray actors: same outputs as in-process, failures still recorded."""

from __future__ import annotations

import os
import tempfile

import nibabel as nib
import numpy as np
import pytest

from bratstune.predict.batch import predict_cohort

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    temp = tempfile.mkdtemp(prefix="rbp", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()  # only this driver's local cluster; never `ray stop`


def test_two_workers_match_in_process(ray_local, trained_ensemble, mixed_cohort, tmp_path):
    root, good, missing, corrupt = mixed_cohort
    local = predict_cohort(
        root, trained_ensemble, tmp_path / "one", workers=1, threads=1, progress=False, experiment=None
    )
    two = predict_cohort(root, trained_ensemble, tmp_path / "two", workers=2, threads=1, progress=True, experiment=None)
    assert sorted(two.predicted) == sorted(local.predicted) == sorted(good)
    assert {f["case_id"] for f in two.failures} == {missing, corrupt} and not two.ok
    for case_id in good:
        a = np.asarray(nib.load(tmp_path / "one" / f"{case_id}-seg.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "two" / f"{case_id}-seg.nii.gz").dataobj)
        assert np.array_equal(a, b)
    again = predict_cohort(
        root, trained_ensemble, tmp_path / "two", workers=2, threads=1, progress=False, experiment=None
    )
    assert again.predicted == []
