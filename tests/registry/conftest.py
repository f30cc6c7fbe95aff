"""Fixtures for ensemble packaging and registry tests: seeded (untrained) tiny networks.

Training adds nothing to what these tests check (packaging, integrity, promotion gate, bit-exact
reload), so members are ``build_network`` + a fixed seed: deterministic and instant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

TINY = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
    "data": {"patch_size": [24, 24, 24]},
    "challenge": "GLI",
}


def make_member(seed: int, name: str | None = None, metrics: dict | None = None):
    from bratstune.ensemble.member import Member
    from bratstune.labels import scheme_for
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    config = resolve_config(load_train_config(TINY))
    torch.manual_seed(seed)
    model = build_network(config, scheme_for("GLI")).eval()
    return Member(name or f"seed{seed}", config, model, dict(metrics or {}))


def make_ensemble(seeds=(0, 1), *, metric: float = 0.5, **kwargs):
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig

    kwargs.setdefault("inference", InferenceConfig(overlap=0.25, flips=True))
    return Ensemble.from_members(
        [make_member(s) for s in seeds],
        scheme="brats2023",
        challenge="GLI",
        metrics={"val/dice_mean": metric},
        **kwargs,
    )


@pytest.fixture(scope="session")
def raw_case(tmp_path_factory):
    """One procedural 32^3 GLI case on disk and its loaded CaseData."""
    from bratstune.data.case import load_case
    from bratstune.data.layout import discover
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("raw-case")
    generate_cohort(root, challenge="GLI", cases=1, shape=(32, 32, 32), anatomy="procedural", seed=3, workers=1)
    case = discover(root).cases[0]
    return case, load_case(case)


@pytest.fixture(scope="session")
def _store_uri(tmp_path_factory) -> str:
    """One SQLite store for the session (creating MLflow's schema takes ~10 s on these machines)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


@pytest.fixture()
def mlflow_store(_store_uri, monkeypatch):
    """The private SQLite tracking store (artifacts next to it); tests use distinct model names."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store_uri)
    mlflow.set_tracking_uri(_store_uri)
    yield _store_uri
    if mlflow.active_run() is not None:
        mlflow.end_run()


def random_image(seed: int = 0, shape=(4, 30, 28, 26)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, size=shape).astype(np.float32)
    image[:, :3] = 0  # background border, so cropping does something
    return image


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    return tmp_path / "out"
