"""Partial tuning of A (MambaPEFT's A-tuning "v2", Yoshimura et al. 2025): A_log' = A_log + delta.

delta [E, N] is zero at init and the original A_log stays frozen; the method's weight decay (amplified by
``weight_decay_mult``, 10 in the reference recipe) acts on delta, pulling A back toward its pretrained value
rather than toward zero. Trainable per layer: E N. Mergeable: A_log <- A_log + delta.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import ALogDeltaConfig
from trials.methods.base import ModelDims, mixers


class AdditiveDelta(nn.Module):
    """Parametrisation P -> P + delta with delta zero-initialised, of P's shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value + self.delta.to(value.dtype)


class ALogDelta:
    name = "a_log_delta"
    mergeable = True

    def count(self, cfg: ALogDeltaConfig, dims: ModelDims) -> int:
        return dims.L * dims.E * dims.N

    def apply(self, lm: nn.Module, cfg: ALogDeltaConfig) -> list[nn.Parameter]:
        params = []
        for mixer in mixers(lm):
            delta = AdditiveDelta(mixer.A_log.shape)
            parametrize.register_parametrization(mixer, "A_log", delta)
            params.append(delta.delta)
        return params
