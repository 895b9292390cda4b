"""ProDiaL (Ham et al. 2025, "Parameter-efficient fine-tuning of state space models via projector-targeted
diagonal-centric linear transformation") on ``in_proj`` or ``out_proj`` of any mixer kind (sizes from its spec), or
on one named block of ``in_proj``'s output rows (x, z; on Mamba-2 also B, C, dt), the rows outside it unchanged:

    W' = diag(s) W T + scale * B A,    T = I + blockdiag(R_1, ..., R_b)

W [out, in]; R_j [k, k] the zero-initialised blocks of ``block_size`` k input features (b = in / k); s [out]
ones-initialised output scale; A [r, in] Kaiming-uniform and B [out, r] zeros (the LoRA part). At init T = I,
s = 1 and B = 0, so W' = W exactly.

The reference code sets T's diagonal to 1 - ReLU(diag R) with R zero-initialised, so the diagonal never gets a
gradient (ReLU'(0) = 0; peft-methods.md pitfall P10). Here the diagonal is 1 + R_jj like the rest of the
block, which is differentiable at init, so every entry of R learns. Trainable per layer: in k + out + r (in +
out). Mergeable: W <- W'.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import ProdialConfig
from trials.methods.base import MethodError, OnRows, mixers
from trials.models.interface import ModelDims


class BlockTransform(nn.Module):
    """A parametrisation of a weight's rows [start, stop) only: W -> [W_<start; f(W_block); W_>=stop]."""

    def __init__(self, inner: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.inner, self.start, self.stop = inner, start, stop

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        block = self.inner(weight[self.start:self.stop])  # [rows, in]
        return torch.cat([weight[:self.start], block, weight[self.stop:]])  # [out, in]


class ProdialTransform(nn.Module):
    def __init__(self, out_features: int, in_features: int, block_size: int, rank: int, scale: float) -> None:
        super().__init__()
        self.block_size, self.scale = block_size, scale
        self.blocks = nn.Parameter(torch.zeros(in_features // block_size, block_size, block_size))  # [b, k, k]
        self.out_scale = nn.Parameter(torch.ones(out_features))  # [out]
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out_f, in_f = weight.shape
        b, k = self.blocks.shape[0], self.block_size
        # W T = W + W blockdiag(R): each block of k input columns times its R_j.
        mixed = torch.einsum("obi,bij->obj", weight.reshape(out_f, b, k), self.blocks.to(weight.dtype))
        transformed = weight + mixed.reshape(out_f, in_f)  # [out, in]
        lora = self.scale * (self.lora_B @ self.lora_A)  # [out, in]
        return self.out_scale.to(weight.dtype)[:, None] * transformed + lora.to(weight.dtype)


class Prodial(OnRows):
    mergeable = True

    def check(self, cfg: ProdialConfig, dims: ModelDims) -> str | None:
        start, stop = self._rows(dims.mixer)
        proj = dims.mixer.projection(self.projection)
        return self._refusal(cfg, stop - start, proj.in_features, f"mixer.{self.projection}")

    def _refusal(self, cfg: ProdialConfig, out_f: int, in_f: int, where: str) -> str | None:
        if in_f % cfg.block_size:
            return f"{self.name}.block_size {cfg.block_size} does not divide the input size {in_f} of {where}"
        if cfg.rank > min(in_f, out_f):
            return f"{self.name}.rank {cfg.rank} exceeds the smaller side {min(in_f, out_f)} of {where}"
        return None

    def count(self, cfg: ProdialConfig, dims: ModelDims) -> int:
        start, stop = self._rows(dims.mixer)
        out_f, in_f = stop - start, dims.mixer.projection(self.projection).in_features
        return dims.L * (in_f * cfg.block_size + out_f + cfg.rank * (in_f + out_f))

    def apply(self, lm: nn.Module, cfg: ProdialConfig) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for mixer in mixers(lm):
            module = mixer.projection(self.projection)
            start, stop = self._rows(mixer.spec)
            in_f = module.weight.shape[1]
            reason = self._refusal(cfg, stop - start, in_f, f"{mixer.path}.{self.projection}")
            if reason:
                raise MethodError(reason)
            transform: nn.Module = ProdialTransform(stop - start, in_f, cfg.block_size, cfg.rank, cfg.scale)
            if (start, stop) != (0, module.weight.shape[0]):
                transform = BlockTransform(transform, start, stop)
            parametrize.register_parametrization(module, "weight", transform.to(module.weight.device))
            params += list(transform.parameters())
        return params


_M2 = ": on Mamba-1 in_proj holds x and z only, and B, C and dt come from x_proj (use lora_x_proj_{})"

PRODIAL_METHODS = [
    Prodial("prodial_in_proj", "in_proj"),
    *(Prodial(f"prodial_in_proj_{b}", "in_proj", b) for b in ("x", "z")),
    *(Prodial(f"prodial_in_proj_{b}", "in_proj", b, instead=_M2.format(b)) for b in ("b", "c", "dt")),
    Prodial("prodial_out_proj", "out_proj"),
]
