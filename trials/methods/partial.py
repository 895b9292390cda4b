"""Partial tuning as zero-init additive deltas (MambaPEFT's A-, D-, Conv1d- and Bias-tuning "v2",
Yoshimura et al. 2025): P' = P + delta on ``mixer.A_log`` [E, N], ``mixer.D`` [E], ``mixer.conv1d.weight``
[E, 1, K] or ``mixer.dt_proj.bias`` [E]; on every RMSNorm weight (``layers.i.norm.weight`` and ``norm_f``, [D]
each, ssm-peft's LayerFreeze set); and BitFit (ssm-peft's ``conv_dt``: the conv1d and dt_proj biases).

delta is zero at init and the original P stays frozen; the method's weight decay (amplified by
``weight_decay_mult``: 10 for A/D/conv1d, 100 for the biases in the reference recipe) acts on delta, pulling P
back toward its pretrained value rather than toward zero. Trainable per layer: EN, E, EK, E; (L + 1) D for the
norms; 2E for BitFit. Mergeable: P <- P + delta. A model built without a conv1d bias gets a zero one for BitFit
(and its config says ``use_conv_bias: true``, so the merged checkpoint loads with it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def _conv_bias(lm: Any, i: int) -> None:
    """Give ``layers.i.mixer.conv1d`` a frozen zero bias if it was built without one (BitFit creates it)."""
    mixer = mixers(lm)[i]
    if mixer.conv1d.bias is None:
        weight = mixer.conv1d.weight
        mixer.conv1d.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                         requires_grad=False)
        mixer.use_conv_bias = True
        lm.config.use_conv_bias = True


class PartialDelta:
    """A zero-init additive delta on each tensor ``paths`` names (dotted paths from the model's root)."""

    mergeable = True

    def __init__(self, name: str, paths: Callable[[ModelDims], list[str]], size: Callable[[ModelDims], int],
                 prepare: Callable[[nn.Module, int], None] | None = None) -> None:
        self.name, self.paths, self.size, self.prepare = name, paths, size, prepare

    def count(self, cfg: DeltaConfig, dims: ModelDims) -> int:
        return self.size(dims)

    def apply(self, lm: nn.Module, cfg: DeltaConfig) -> list[nn.Parameter]:
        dims = ModelDims.from_config(lm.config)
        mixers(lm)  # a Mamba-1 model, or a clear error
        params = []
        for i, path in enumerate(self.paths(dims)):
            if self.prepare is not None:
                self.prepare(lm, i)
            owner_path, _, tensor = path.rpartition(".")
            owner = lm.get_submodule(owner_path)
            current = getattr(owner, tensor, None)
            if current is None:
                raise MethodError(f"{self.name}: {path} does not exist (a model built without it)")
            delta = AdditiveDelta(current.shape).to(current.device)
            parametrize.register_parametrization(owner, tensor, delta)
            params.append(delta.delta)
        return params


def _per_layer(*suffixes: str) -> Callable[[ModelDims], list[str]]:
    return lambda m: [f"backbone.layers.{i}.{s}" for i in range(m.L) for s in suffixes]


PARTIAL_METHODS = [
    PartialDelta("a_log_delta", _per_layer("mixer.A_log"), lambda m: m.L * m.E * m.N),
    PartialDelta("d_delta", _per_layer("mixer.D"), lambda m: m.L * m.E),
    PartialDelta("conv1d_delta", _per_layer("mixer.conv1d.weight"), lambda m: m.L * m.E * m.K),
    PartialDelta("dt_bias_delta", _per_layer("mixer.dt_proj.bias"), lambda m: m.L * m.E),
    PartialDelta("norm_delta", lambda m: [*_per_layer("norm.weight")(m), "backbone.norm_f.weight"],
                 lambda m: (m.L + 1) * m.D),
    PartialDelta("bitfit", lambda m: [p for i in range(m.L) for p in (f"backbone.layers.{i}.mixer.conv1d.bias",
                                                                       f"backbone.layers.{i}.mixer.dt_proj.bias")],
                 lambda m: m.L * 2 * m.E, prepare=lambda lm, j: _conv_bias(lm, j // 2)),
]
