"""Parallel adapter beside ``out_proj`` (AdaptFormer, Chen et al. 2022; MambaPEFT's ParallelAdapter,
Yoshimura et al. 2025).

out = out_proj(y) + scale * Up(Dropout(ReLU(Down(y)))), y the gated scan output [B, L, E]; Down Linear(E -> r)
with PyTorch's default init, Up Linear(r -> D) zero-initialised, both without bias, so the model is unchanged at
init. Trainable per layer: r (E + D). Not mergeable (the ReLU): saved as adapter weights. The adapter runs as a
forward hook of ``out_proj``, so every path that calls ``out_proj`` runs it; the project's mixer leaves the
fused CUDA kernel (which applies out_proj inside) when an adapter is present.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from space.methods import AdapterConfig
from trials.methods.base import MethodError, mixers
from trials.models.interface import Architecture, ModelDims


class ParallelAdapterModule(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(in_features, rank, bias=False)  # [r, E]
        self.up = nn.Linear(rank, out_features, bias=False)  # [D, r]
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(y))))  # [B, L, D]


class ParallelAdapter:
    name = "parallel_adapter"
    mergeable = False

    def refusal(self, arch: Architecture) -> str | None:
        # transformers' Mamba-2 forward hands out_proj's weight to its fused CUDA kernel, which would skip a branch
        # beside out_proj: there it needs the project's Mamba-2 mixer, which leaves the kernel for it.
        from trials.methods.state import project_hook

        return project_hook(arch, "parallel_adapter")

    def count(self, cfg: AdapterConfig, dims: ModelDims) -> int:
        out_proj = dims.mixer.projection("out_proj")
        return dims.L * cfg.rank * (out_proj.in_features + out_proj.out_features)

    def apply(self, lm: Any, cfg: AdapterConfig) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for mixer in mixers(lm):
            if not mixer.honours("parallel_adapter"):
                raise MethodError(f"{self.name}: {mixer.path} runs {mixer.runtime}, which does not honour a "
                                  "parallel adapter")
            out_proj = mixer.projection("out_proj")
            out_f, in_f = out_proj.weight.shape
            adapter = ParallelAdapterModule(in_f, out_f, cfg.rank, cfg.scale, cfg.dropout)
            adapter.to(out_proj.weight.device)
            # The mixer's attribute tells the project's forward to leave the fused kernel (which applies out_proj
            # inside); the forward hook of out_proj adds the branch.
            mixer.set_hook("parallel_adapter", adapter)

            def add_adapter(module: nn.Module, inputs: tuple, output: torch.Tensor,
                            adapter: ParallelAdapterModule = adapter) -> torch.Tensor:
                return output + adapter(inputs[0]).to(output.dtype)

            out_proj.register_forward_hook(add_adapter)
            params += list(adapter.parameters())
        return params


ADAPTER_METHODS = [ParallelAdapter()]
