"""Device choice from a trial's own resource request (unit tests; torch.cuda is stubbed)."""

from __future__ import annotations

import pytest
import torch

from bratstune.device import amp_dtype, select_trial_device
from bratstune.errors import ConfigError


@pytest.fixture
def fake_gpu(monkeypatch):
    """A process that *sees* one CUDA device, as every Ray worker on a GPU node does."""
    calls: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    return calls


def test_a_trial_without_a_gpu_share_runs_on_cpu_even_when_cuda_is_visible(fake_gpu):
    assert select_trial_device("auto", gpus=0) == torch.device("cpu")
    assert select_trial_device("cpu", gpus=0) == torch.device("cpu")
    assert fake_gpu == []


def test_a_gpu_share_selects_cuda_and_caps_its_memory(fake_gpu):
    assert select_trial_device("auto", gpus=0.25) == torch.device("cuda")
    assert fake_gpu == [(0.25, torch.device("cuda"))]
    assert select_trial_device("auto", gpus=1) == torch.device("cuda")
    assert len(fake_gpu) == 1  # a whole GPU is not capped


def test_cuda_without_a_share_and_negative_shares_are_refused(fake_gpu):
    with pytest.raises(ConfigError, match="asked for no GPU"):
        select_trial_device("cuda", gpus=0)
    with pytest.raises(ConfigError, match="share >= 0"):
        select_trial_device("auto", gpus=-1)


def test_a_share_on_a_machine_without_cuda_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_trial_device("auto", gpus=0.5) == torch.device("cpu")


def test_amp_is_on_only_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert amp_dtype(torch.device("cpu"), "auto") is None
    assert amp_dtype(torch.device("cuda"), "auto") == torch.bfloat16
