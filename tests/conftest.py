"""Shared fixtures: a tiny random Mamba for fast method checks, and small trial configs on the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# `embedded` is the tiny checkpoint in the suite, for speed (trials.models.loading.EMBEDDED_ENV); tests of the default
# checkpoint name embedded-small or clear the variable. Set here, so subprocesses and Ray workers inherit it.
os.environ.setdefault("MAMBA_PEFT_EMBEDDED", "embedded-tiny")

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


# Every CPU execution path the project supports: its mixer with the compiled kernel and with the pure-PyTorch
# scan, and transformers' own mambapy path.
SCAN_PATHS = ("compiled", "torch", "mambapy")


@pytest.fixture(params=SCAN_PATHS)
def tiny_lm(request):
    """A randomly initialised Mamba-1 small enough for exhaustive checks (D=32, E=64, N=4, R=2, 2 layers), on each
    execution path."""
    from transformers import MambaConfig, MambaForCausalLM

    from trials.models.loading import quiet_transformers, use_scan

    quiet_transformers()
    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=40, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    return use_scan(MambaForCausalLM(cfg), request.param).eval()


@pytest.fixture
def tiny_ids():
    return torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(1))


def small_trial_yaml(methods: str = "lora_in_proj: {rank: 2}\n  a_log_delta: {}", steps: int = 6,
                     eval_every: int = 3, checkpoint: str = "embedded") -> str:
    rungs = sorted({*range(eval_every, steps, eval_every), steps})
    return f"""
model: {{checkpoint: {checkpoint}}}
task: {{name: digits, shots_per_class: 2}}
methods:
  {methods}
training: {{rungs: {rungs}, batch_size: 8, learning_rate: 0.005, weight_decay: 0.0001,
  warmup_fraction: 0.1, head_lr_mult: 1.0, grad_clip: 1.0}}
seed: 0
"""


@pytest.fixture
def small_trial():
    from space.config import TrialConfig

    return TrialConfig.from_yaml(small_trial_yaml())
