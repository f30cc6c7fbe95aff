"""Swapped or booby-trapped registered models are refused before any code from the package runs.

Both ways of swapping a model are covered, on the stored artifact of a real registry version:
(a) a file edited and the manifest regenerated (the recorded digest no longer matches), and
(b) a foreign ``python_model.pkl``-style payload planted in the package (a pickle whose
``__reduce__`` writes a marker file). The loaders tried are bratstune's (``load_ensemble``,
``load_verified_pyfunc``) and a bare ``mlflow.pyfunc.load_model`` in a fresh process, where
nothing of bratstune is imported unless the package's code is: the marker planted in the
shipped ``code/bratstune/__init__.py`` and ``sys.modules`` prove that none of it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml

from bratstune.ensemble.registry import load_ensemble, register_ensemble
from bratstune.integrity import DIGEST_TAG, MANIFEST_FILE, REGISTERED_META, IntegrityError, write_manifest
from bratstune.tracking.model_package import load_verified_pyfunc

from .conftest import make_ensemble

pytestmark = pytest.mark.mlflow

METRIC = "val/dice_mean"
FRESH_LOAD = textwrap.dedent("""
    import json, sys
    import mlflow.pyfunc
    out = {}
    try:
        mlflow.pyfunc.load_model(sys.argv[1])
        out["outcome"] = "loaded"
    except Exception as exc:
        out.update(outcome="refused", type=type(exc).__name__, error=str(exc))
    out["bratstune_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "bratstune")
    import bratstune  # after a refusal: the installed package, never the refused package's code/
    out["bratstune_file"] = bratstune.__file__
    print("RESULT " + json.dumps(out))
""")


class Payload:
    """Unpickling this runs code: it writes ``marker`` (what a foreign ``python_model.pkl`` would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def _register(name: str, seeds=(0,)) -> tuple[str, str]:
    from bratstune.tracking.runs import setup_mlflow, start_run

    experiment_id = setup_mlflow("tamper-test")
    with start_run(run_name="register", experiment_id=experiment_id) as run:
        version = str(register_ensemble(make_ensemble(seeds=seeds), name=name, metric=METRIC).version)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return version, run.info.run_id


def _stored(name: str, version: str) -> Path:
    """The version's own artifact folder in the store (what every later download copies)."""
    location = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    return Path(location[len("file://") :] if location.startswith("file://") else location)


def _fresh_load(uri: str, store: str, cwd: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, uri], env=env, cwd=cwd, capture_output=True, text=True, timeout=240
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _plant_import_marker(store: Path, marker: Path) -> None:
    """Make the shipped ``bratstune`` package write ``marker`` the moment it is imported."""
    init = store / "code" / "bratstune" / "__init__.py"
    init.write_text(f"open({str(marker)!r}, 'w').write('imported')\n" + init.read_text())


def test_registered_package_is_code_not_pickle_and_its_manifest_covers_every_file(mlflow_store, tmp_path):
    name = "bratstune-layout"
    version, run_id = _register(name)
    mv = mlflow.MlflowClient().get_model_version(name, version)
    loaded = load_ensemble(f"models:/{name}/{version}", dst=tmp_path / "dl", keep_download=True)
    root = loaded.folder.parents[1]  # <model>/artifacts/ensemble
    files = json.loads((root / MANIFEST_FILE).read_text())["files"]
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert sorted(files) == [f for f in on_disk if f not in (MANIFEST_FILE, REGISTERED_META)]
    for expected in (
        "MLmodel",
        "integrity.py",
        "requirements.txt",
        "code/bratstune/integrity.py",
        "code/bratstune/ensemble/pyfunc.py",
        "artifacts/ensemble/ensemble.json",
        "artifacts/ensemble/manifest.json",
        "artifacts/ensemble/members/00-seed0.safetensors",
    ):
        assert expected in files, expected
    assert not [f for f in files if f.endswith((".pkl", ".pyc"))]
    flavor = yaml.safe_load((root / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    digest = hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest()
    assert mv.tags[DIGEST_TAG] == digest
    model_id = yaml.safe_load((root / "MLmodel").read_text())["model_id"]
    assert mlflow.MlflowClient().get_logged_model(model_id).tags[DIGEST_TAG] == digest
    # the run's logged model resolves too, checked against the logged model's digest
    assert load_ensemble(f"runs:/{run_id}/ensemble", dst=tmp_path / "dl-run").ensemble.digest == loaded.ensemble.digest
    loaded.cleanup()
    # and a bare MLflow load works, through the verifying entry
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert type(model.unwrap_python_model()).__name__ == "VerifiedModel"
    assert not list(_stored(name, version).rglob("__pycache__")), "loading wrote bytecode into the package"


@pytest.mark.slow
def test_edited_file_with_regenerated_manifest_is_refused_before_any_package_code_runs(mlflow_store, tmp_path):
    name = "bratstune-edited"
    version, _ = _register(name)
    store = _stored(name, version)
    marker = tmp_path / "package-code-ran"
    # (a) lower a threshold, plant code in the shipped package, regenerate both manifests
    config = store / "artifacts" / "ensemble" / "ensemble.json"
    payload = json.loads(config.read_text())
    payload["thresholds"]["ET"] = 0.01
    config.write_text(json.dumps(payload))
    _plant_import_marker(store, marker)
    write_manifest(store / "artifacts" / "ensemble")
    write_manifest(store)

    with pytest.raises(IntegrityError, match=r"manifest\.json: SHA-256 .* differs from the digest recorded"):
        load_ensemble(f"models:/{name}@champion", dst=tmp_path / "dl")
    assert not (tmp_path / "dl" / "artifacts").exists(), "the refused download was left behind"
    with pytest.raises(IntegrityError, match="differs from the digest recorded"):
        load_verified_pyfunc(f"models:/{name}/{version}")
    fresh = _fresh_load(f"models:/{name}@champion", mlflow_store, tmp_path)
    assert fresh["outcome"] == "refused" and fresh["type"] == "IntegrityError", fresh
    assert "differs from the digest recorded at registration" in fresh["error"]
    assert fresh["bratstune_modules"] == [], "bratstune was imported before the package was verified"
    import bratstune

    assert fresh["bratstune_file"] == bratstune.__file__, "the refused package's code/ stayed on sys.path"
    assert not marker.exists(), "code from the package ran"


@pytest.mark.slow
def test_planted_pickle_payload_is_refused_and_never_unpickled(mlflow_store, tmp_path):
    name = "bratstune-pickled"
    version, _ = _register(name)
    store = _stored(name, version)
    marker = tmp_path / "payload-ran"
    (store / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    # (b-1) the payload sits in the package; MLmodel still names the verifying code file
    with pytest.raises(IntegrityError, match=r"python_model\.pkl: not listed in manifest\.json"):
        load_ensemble(f"models:/{name}@champion", dst=tmp_path / "dl")
    fresh = _fresh_load(f"models:/{name}/{version}", mlflow_store, tmp_path)
    assert fresh["outcome"] == "refused" and "python_model.pkl: not listed" in fresh["error"], fresh
    assert fresh["bratstune_modules"] == []
    # (b-2) MLmodel rewritten to unpickle it, manifest regenerated: the recorded digest refuses it
    mlmodel = store / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    flavor = spec["flavors"]["python_function"]
    flavor.pop("model_code_path")
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    mlmodel.write_text(yaml.safe_dump(spec))
    write_manifest(store)
    with pytest.raises(IntegrityError, match="differs from the digest recorded"):
        load_ensemble(f"models:/{name}@champion", dst=tmp_path / "dl2")
    with pytest.raises(IntegrityError, match="differs from the digest recorded"):
        load_verified_pyfunc(f"models:/{name}@champion")
    assert not marker.exists(), "the planted pickle was unpickled"


@pytest.mark.slow
def test_a_package_swapped_for_another_registered_one_is_refused(mlflow_store, tmp_path):
    name = "bratstune-swapped"
    v1, _ = _register(name, seeds=(0,))
    v2, _ = _register(name, seeds=(1,))
    first, second = _stored(name, v1), _stored(name, v2)
    for path in sorted(second.iterdir()):  # v2's location now holds v1's genuine, self-consistent package
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
            shutil.copytree(first / path.name, path)
        else:
            path.write_bytes((first / path.name).read_bytes())
    assert load_ensemble(f"models:/{name}/{v1}", dst=tmp_path / "dl1").version == v1
    with pytest.raises(IntegrityError, match="differs from the digest recorded"):
        load_ensemble(f"models:/{name}/{v2}", dst=tmp_path / "dl2")
    fresh = _fresh_load(f"models:/{name}/{v2}", mlflow_store, tmp_path)
    assert fresh["outcome"] == "refused" and "differs from the digest recorded" in fresh["error"], fresh


class _OldModel(mlflow.pyfunc.PythonModel):
    """A cloudpickled model as older bratstune versions registered them (its pickle runs code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))

    def predict(self, context, model_input, params=None):
        return model_input


def test_old_pickled_package_without_digest_is_refused_with_how_to_reregister(mlflow_store, tmp_path, capsys):
    name = "bratstune-old"
    marker = tmp_path / "old-payload-ran"
    from bratstune.tracking.runs import setup_mlflow, start_run

    with start_run(run_name="old", experiment_id=setup_mlflow("tamper-test")):
        info = mlflow.pyfunc.log_model(
            name="ensemble",
            python_model=_OldModel(str(marker)),
            registered_model_name=name,
            pip_requirements=["mlflow"],  # else MLflow loads the model to infer them
        )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_model_version_tag(name, version, "lineage.members", "0123abcd,4567efgh")
    assert not marker.exists()
    with pytest.raises(IntegrityError) as refused:
        load_ensemble(f"models:/{name}/{version}", dst=tmp_path / "dl")
    message = str(refused.value)
    assert f"models:/{name}/{version} has no recorded package digest" in message
    assert "pickled python_model.pkl" in message
    assert "bratstune promote --members 0123abcd 4567efgh" in message
    assert not marker.exists(), "the old package was unpickled"
    from bratstune.cli import main

    assert main(["models", "list", "--name", name]) == 0
    listed = capsys.readouterr().out
    assert "old package (no recorded digest)" in listed and "bratstune promote" in listed


def test_ensemble_json_cannot_point_outside_its_package(tmp_path):
    from bratstune.ensemble.package import Ensemble

    folder = make_ensemble(seeds=(0,)).save(tmp_path / "pkg")
    (tmp_path / "outside.safetensors").write_bytes((folder / "members" / "00-seed0.safetensors").read_bytes())
    payload = json.loads((folder / "ensemble.json").read_text())
    payload["members"][0]["weights"] = "../outside.safetensors"
    (folder / "ensemble.json").write_text(json.dumps(payload))
    write_manifest(folder)  # a self-consistent local folder: only the path check stands in the way
    with pytest.raises(IntegrityError, match=r"member weights path '\.\./outside\.safetensors'"):
        Ensemble.load(folder)
