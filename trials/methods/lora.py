"""LoRA (Hu et al. 2021) on the Mamba-1 projections, and MambaPEFT's partial LoRA on blocks of their output
rows (Yoshimura et al. 2025: LoRA_p(X), LoRA_p(Z) on in_proj; LoRA_p(d), LoRA_p(B), LoRA_p(C) on x_proj).

W' = W + scale * pad(B A) with A [r, in] Kaiming-uniform (as ``nn.Linear`` initialises) and B [rows, r] zeros,
padded with zero rows outside the targeted block, so the model is unchanged at init. The delta is applied as a
parametrisation of the weight, so every path that reads ``weight`` (module calls, transformers' direct
``dt_proj.weight @ ...``, the fused CUDA kernel) sees W'. Trainable per layer: r (in + rows), plus ``rows``
magnitudes with DoRA. Mergeable: W <- W'.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from space.methods import LoraConfig
from trials.methods.base import MethodError, ModelDims, mixers

Rows = Callable[[ModelDims], tuple[int, int]]  # the targeted output rows [start, stop) from the model sizes


class LoraDelta(nn.Module):
    """Parametrisation W -> W + scale * B A on output rows [start, stop) of a weight [out, in].

    With ``dora_init`` (the weight W it will adapt) it is DoRA (Liu et al. 2024) on those rows:
    W'_i = m_i V_i / ||V_i|| with V = W + scale * B A, the norm per output row and detached (as the DoRA paper
    does to save memory), and m initialised to ||W_i||, so the model is unchanged at init. The norm is per
    output row, as in HF peft (MambaPEFT's language code takes it per input column).
    """

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, start: int = 0,
                 stop: int | None = None, dora_init: torch.Tensor | None = None) -> None:
        super().__init__()
        stop = out_features if stop is None else stop
        self.scale, self.start, self.stop = scale, start, stop
        self.pad = (0, 0, start, out_features - stop)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(stop - start, rank))  # [rows, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.magnitude: nn.Parameter | None = None
        if dora_init is not None:
            self.magnitude = nn.Parameter(dora_init[start:stop].detach().float().norm(dim=1))  # [rows]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.lora_B @ self.lora_A)  # [rows, in]
        if self.magnitude is None:
            if any(self.pad):
                delta = F.pad(delta, self.pad)  # [out, in]
            return weight + delta.to(weight.dtype)
        rows = weight[self.start : self.stop] + delta.to(weight.dtype)  # [rows, in]
        rows = rows * (self.magnitude / rows.norm(dim=1).detach()).to(weight.dtype)[:, None]
        return torch.cat([weight[: self.start], rows, weight[self.stop :]])  # [out, in]


class Lora:
    """LoRA on ``mixer.<module>.weight``, on all its output rows or on the block ``rows`` gives."""

    mergeable = True

    def __init__(self, name: str, module: str, in_size: Callable[[ModelDims], int],
                 out_size: Callable[[ModelDims], int], rows: Rows | None = None) -> None:
        self.name, self.module = name, module
        self.in_size, self.out_size = in_size, out_size
        self.rows = rows or (lambda d: (0, out_size(d)))

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        start, stop = self.rows(dims)
        magnitude = stop - start if cfg.dora else 0
        return dims.L * (cfg.rank * (self.in_size(dims) + stop - start) + magnitude)

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        dims = ModelDims.from_config(lm.config)
        start, stop = self.rows(dims)
        params = []
        for i, mixer in enumerate(mixers(lm)):
            module = getattr(mixer, self.module)
            out_f, in_f = module.weight.shape
            if cfg.rank > min(stop - start, in_f):
                raise MethodError(f"{self.name}.rank {cfg.rank} exceeds the adapted block's smaller side "
                                  f"{min(stop - start, in_f)} (backbone.layers.{i}.mixer.{self.module})")
            delta = LoraDelta(out_f, in_f, cfg.rank, cfg.scale, start, stop,
                              dora_init=module.weight if cfg.dora else None)
            parametrize.register_parametrization(module, "weight", delta)
            params += [delta.lora_A, delta.lora_B] + ([delta.magnitude] if delta.magnitude is not None else [])
        return params


def _lora_methods() -> list[Lora]:
    def d(m: ModelDims) -> int:
        return m.D

    def e(m: ModelDims) -> int:
        return m.E

    def r(m: ModelDims) -> int:
        return m.R

    def two_e(m: ModelDims) -> int:
        return 2 * m.E

    def x_rows(m: ModelDims) -> int:
        return m.R + 2 * m.N

    return [
        Lora("lora_in_proj", "in_proj", d, two_e),
        Lora("lora_in_proj_x", "in_proj", d, two_e, lambda m: (0, m.E)),
        Lora("lora_in_proj_z", "in_proj", d, two_e, lambda m: (m.E, 2 * m.E)),
        Lora("lora_x_proj", "x_proj", e, x_rows),
        Lora("lora_x_proj_dt", "x_proj", e, x_rows, lambda m: (0, m.R)),
        Lora("lora_x_proj_b", "x_proj", e, x_rows, lambda m: (m.R, m.R + m.N)),
        Lora("lora_x_proj_c", "x_proj", e, x_rows, lambda m: (m.R + m.N, m.R + 2 * m.N)),
        Lora("lora_dt_proj", "dt_proj", r, e),
        Lora("lora_out_proj", "out_proj", e, d),
    ]


LORA_METHODS = _lora_methods()
