"""Fixtures of the reliability suite: a valid tiny cohort and a tiny (untrained) model package."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._defects import SHAPE, valid_cohort

#: the synthetic 32 x 32 x 24 cases cover the whole brain, so their voxels are 7.5 x 7.5 x 6.45 mm
TINY_SPACING = [7.5, 7.5, 6.45]


def tiny_package(dst: Path) -> Path:
    """A one-member ensemble folder: a unet [4, 8, 16] with fixed random weights (seed 0), on the
    cohort's own grid. Prediction quality is irrelevant here; being fast and deterministic is not."""
    import torch

    from bratstune.ensemble.member import Member
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig
    from bratstune.labels import scheme_for
    from bratstune.training.config import load_train_config
    from bratstune.training.network import build_network, resolve_config

    torch.manual_seed(0)
    config = resolve_config(
        load_train_config(
            {
                "model": {"name": "unet", "kwargs": {"filters": [4, 8, 16], "deep_supr_num": 1}},
                "data": {"patch_size": list(SHAPE), "preprocess": {"target_spacing": TINY_SPACING}},
                "challenge": "GLI",
            }
        )
    )
    network = build_network(config, scheme_for("GLI")).eval()
    ensemble = Ensemble.from_members(
        [Member("m0", config, network)],
        scheme="brats2023",
        challenge="GLI",
        inference=InferenceConfig(overlap=0.0, flips=False),
    )
    return ensemble.save(dst)


@pytest.fixture(scope="session")
def base_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "cohort"
    valid_cohort(root)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_package(tmp_path_factory.mktemp("reliability-model") / "ensemble")


TRAIN_YAML = (
    "model: {name: unet, kwargs: {filters: [4, 8, 16], deep_supr_num: 1}}\n"
    "data: {patch_size: [16, 16, 16], batch_size: 1, num_workers: 0}\n"
    "epochs: 1\nsteps_per_epoch: 1\nnum_threads: 1\nvalidation: {lesion_metrics: false}\n"
)


@pytest.fixture(scope="session")
def train_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability-config") / "tiny.yaml"
    path.write_text(TRAIN_YAML)
    return path
