"""The MAE encoder follows the ensemble's rules: a manifest of every file, a recorded digest, no pickle.

Exported folders (``save_encoder``) are verified before ``init.encoder_from`` reads them; a
registered encoder is a models-from-code package whose digest is recorded on its version, and
``models:/`` sources are checked against it when they are downloaded for training.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
import yaml

from bratstune.integrity import DIGEST_TAG, MANIFEST_FILE, IntegrityError, write_manifest
from bratstune.models import build_model
from bratstune.models.encoder_init import load_encoder_weights
from bratstune.pretrain.export import register_encoder, save_encoder

TINY_MAE = {
    "img_size": [32, 32, 32],
    "hidden_size": 48,
    "mlp_dim": 96,
    "num_heads": 3,
    "decoder_hidden_size": 48,
    "decoder_mlp_dim": 96,
    "decoder_num_heads": 3,
    "decoder_num_layers": 1,
}
TINY_UNETR = {"patch_size": [32, 32, 32], "feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 3}


@pytest.fixture
def export(tmp_path):
    from bratstune.pretrain.config import MaeModelConfig
    from bratstune.pretrain.model import MaskedAutoencoder3D

    torch.manual_seed(0)
    return save_encoder(MaskedAutoencoder3D(MaeModelConfig(**TINY_MAE)), tmp_path / "export").parent


def test_an_export_is_a_verified_package(export):
    files = json.loads((export / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == ["encoder.json", "encoder.pt"]
    assert load_encoder_weights(build_model("unetr", 4, 3, **TINY_UNETR), export).complete


@pytest.mark.parametrize("source", ["folder", "file"])
def test_a_tampered_export_is_refused_before_torch_reads_it(export, source):
    blob = bytearray((export / "encoder.pt").read_bytes())
    blob[-20] ^= 0xFF
    (export / "encoder.pt").write_bytes(bytes(blob))
    target = export if source == "folder" else export / "encoder.pt"
    with pytest.raises(IntegrityError, match=r"encoder\.pt: SHA-256 mismatch"):
        load_encoder_weights(build_model("unetr", 4, 3, **TINY_UNETR), target)


def test_an_export_without_manifest_is_refused_and_a_planted_file_too(export):
    (export / "extra.pt").write_bytes(b"\x80\x04N.")
    with pytest.raises(IntegrityError, match=r"extra\.pt: not listed"):
        load_encoder_weights(build_model("unetr", 4, 3, **TINY_UNETR), export)
    (export / "extra.pt").unlink()
    (export / MANIFEST_FILE).unlink()
    with pytest.raises(IntegrityError, match="missing model manifest"):
        load_encoder_weights(build_model("unetr", 4, 3, **TINY_UNETR), export)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.mark.mlflow
@pytest.mark.slow
def test_registered_encoder_is_verified_against_its_recorded_digest(export, mlflow_store, tmp_path):
    from bratstune.tracking.artifacts import localise_config
    from bratstune.tracking.runs import setup_mlflow, start_run

    name = "bratstune-mae-encoder"
    with start_run(run_name="pretrain", experiment_id=setup_mlflow("encoder-test")) as run:
        version, uri = register_encoder(export, run_id=run.info.run_id, name=name, tags={"workers": 2})
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, version)
    assert len(mv.tags[DIGEST_TAG]) == 64 and mv.tags["workers"] == "2"
    # training's route: localise_config downloads and verifies, encoder_init verifies and loads
    config, artifact = localise_config({"init": {"encoder_from": f"models:/{name}@latest"}}, dst=tmp_path / "dl")
    local = config["init"]["encoder_from"]
    flavor = yaml.safe_load((artifact.path / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert load_encoder_weights(build_model("unetr", 4, 3, **TINY_UNETR), local).complete
    # the pyfunc model maps volumes to features, through the verifying entry
    model = mlflow.pyfunc.load_model(uri)
    assert model.predict(np.zeros((2, 4, 32, 32, 32), dtype=np.float32)).shape == (2, 48)
    # edit the stored meta, regenerate the manifest: the recorded digest refuses it
    location = client.get_model_version_download_uri(name, version)
    store = type(export)(location[len("file://") :])
    (store / "artifacts" / "encoder.json").write_text("{}")
    write_manifest(store)
    with pytest.raises(IntegrityError, match="differs from the digest recorded"):
        localise_config({"init.encoder_from": f"models:/{name}/{version}"}, dst=tmp_path / "dl2")
    with pytest.raises(IntegrityError, match="differs from the digest recorded"):
        mlflow.pyfunc.load_model(uri)
