"""Partial tuning as zero-init additive deltas (MambaPEFT's A-, D-, Conv1d- and Bias-tuning "v2",
Yoshimura et al. 2025): P' = P + delta on ``mixer.A_log`` [E, N], ``mixer.D`` [E], ``mixer.conv1d.weight``
[E, 1, K] or ``mixer.dt_proj.bias`` [E].

delta is zero at init and the original P stays frozen; the method's weight decay (amplified by
``weight_decay_mult``: 10 for A/D/conv1d, 100 for the bias in the reference recipe) acts on delta, pulling P
back toward its pretrained value rather than toward zero. Trainable per layer: EN, E, EK, E. Mergeable:
P <- P + delta.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import DeltaConfig
from trials.methods.base import MethodError, ModelDims, mixers


class AdditiveDelta(nn.Module):
    """Parametrisation P -> P + delta with delta zero-initialised, of P's shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value + self.delta.to(value.dtype)


class PartialDelta:
    """A zero-init additive delta on ``mixer.<path>`` (a dotted path to a parameter)."""

    mergeable = True

    def __init__(self, name: str, path: str, size: Callable[[ModelDims], int]) -> None:
        self.name, self.path, self.size = name, path, size

    def count(self, cfg: DeltaConfig, dims: ModelDims) -> int:
        return dims.L * self.size(dims)

    def apply(self, lm: nn.Module, cfg: DeltaConfig) -> list[nn.Parameter]:
        owner_path, _, tensor = self.path.rpartition(".")
        params = []
        for i, mixer in enumerate(mixers(lm)):
            owner = mixer.get_submodule(owner_path) if owner_path else mixer
            current = getattr(owner, tensor, None)
            if current is None:
                raise MethodError(f"{self.name}: backbone.layers.{i}.mixer.{self.path} does not exist "
                                  "(a model built without it)")
            delta = AdditiveDelta(current.shape)
            parametrize.register_parametrization(owner, tensor, delta)
            params.append(delta.delta)
        return params


PARTIAL_METHODS = [
    PartialDelta("a_log_delta", "A_log", lambda m: m.E * m.N),
    PartialDelta("d_delta", "D", lambda m: m.E),
    PartialDelta("conv1d_delta", "conv1d.weight", lambda m: m.E * m.K),
    PartialDelta("dt_bias_delta", "dt_proj.bias", lambda m: m.E),
]
