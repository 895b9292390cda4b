"""LoRA on ``mixer.in_proj`` (Hu et al. 2021; MambaPEFT's LoRA(in_proj), Yoshimura et al. 2025).

W' = W + scale * B A with A [r, D] Kaiming-uniform (as ``nn.Linear`` initialises) and B [2E, r] zeros, so the
model is unchanged at init. Trainable per layer: r (D + 2E). Mergeable: W <- W + scale * B A.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import LoraInProjConfig
from trials.methods.base import MethodError, ModelDims, mixers


class LoraDelta(nn.Module):
    """Parametrisation W -> W + scale * B A for a weight of shape [out, in]."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)  # [out, in]


class LoraInProj:
    name = "lora_in_proj"
    mergeable = True

    def count(self, cfg: LoraInProjConfig, dims: ModelDims) -> int:
        return dims.L * cfg.rank * (dims.D + 2 * dims.E)

    def apply(self, lm: nn.Module, cfg: LoraInProjConfig) -> list[nn.Parameter]:
        params = []
        for i, mixer in enumerate(mixers(lm)):
            out_f, in_f = mixer.in_proj.weight.shape
            if cfg.rank > min(out_f, in_f):
                raise MethodError(f"lora_in_proj.rank {cfg.rank} exceeds in_proj's smaller side {min(out_f, in_f)} "
                                  f"(backbone.layers.{i}.mixer.in_proj)")
            delta = LoraDelta(out_f, in_f, cfg.rank, cfg.scale)
            parametrize.register_parametrization(mixer.in_proj, "weight", delta)
            params += [delta.lora_A, delta.lora_B]
        return params
