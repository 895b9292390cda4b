"""LoRA (Hu et al. 2021) on the Mamba-1 projections, and MambaPEFT's partial LoRA on blocks of their output
rows (Yoshimura et al. 2025: LoRA_p(X), LoRA_p(Z) on in_proj; LoRA_p(d), LoRA_p(B), LoRA_p(C) on x_proj).

W' = W + scale * pad(B A) with A [r, in] Kaiming-uniform (as ``nn.Linear`` initialises) and B [rows, r] zeros,
padded with zero rows outside the targeted block, so the model is unchanged at init. The delta is applied as a
parametrisation of the weight, so every path that reads ``weight`` (module calls, transformers' direct
``dt_proj.weight @ ...``, the fused CUDA kernel) sees W'. Trainable per layer: r (in + rows), plus ``rows``
magnitudes with DoRA. Mergeable: W <- W'.

Also here: LoRA on the depthwise ``conv1d`` (its [E, 1, K] kernel read as an [E, K] matrix, so r <= K), LoRA on
the embeddings (model-level; MambaPEFT's ``EmbedAdapter`` init: the vocabulary side N(0, 1), the hidden side
zero; a tied ``lm_head`` reads the same adapted matrix), and the Halloran-style preset (LoRA on in_proj, out_proj,
x_proj and the embeddings with one config).

LoRA dropout (``dropout > 0``) acts on the adapter's input only, as in peft: out = W x + s B A drop(x). The weight
stays W + s B A; a forward hook adds s B A (drop(x) - x) while training. It needs the module to be called as a
module, which holds for in_proj, x_proj and out_proj on every path (the mixer leaves mamba-ssm's fused kernel when
such a hook is present); dt_proj's weight is read directly and the embeddings are a lookup, so dropout there (and
with DoRA, whose row norm would need the dropped input too) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from space.methods import LoraConfig
from trials.methods.base import MethodError, ModelDims, mixers, stored

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
            rows = dora_init.reshape(out_features, -1)[start:stop]
            self.magnitude = nn.Parameter(rows.detach().float().norm(dim=1))  # [rows]
        self.dropout = nn.Dropout(0.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shape = weight.shape  # [out, in], or [E, 1, K] for conv1d
        weight = weight.reshape(shape[0], -1)  # [out, in]
        delta = self.scale * (self.lora_B @ self.lora_A)  # [rows, in]
        if self.magnitude is None:
            if any(self.pad):
                delta = F.pad(delta, self.pad)  # [out, in]
            return (weight + delta.to(weight.dtype)).reshape(shape)
        rows = weight[self.start : self.stop] + delta.to(weight.dtype)  # [rows, in]
        rows = rows * (self.magnitude / rows.norm(dim=1).detach()).to(weight.dtype)[:, None]
        return torch.cat([weight[: self.start], rows, weight[self.stop :]]).reshape(shape)  # [out, in]

    def dropout_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: replace the adapter's input x by drop(x), i.e. add s B A (drop(x) - x), in training."""
        if not self.training:
            return output
        x = inputs[0]  # [..., in]
        correction = self.scale * F.linear(F.linear(self.dropout(x) - x, self.lora_A), self.lora_B)  # [..., rows]
        if any(self.pad):
            correction = F.pad(correction, (self.start, output.shape[-1] - self.stop))  # [..., out]
        return output + correction.to(output.dtype)


DROPOUT_MODULES = ("in_proj", "x_proj", "out_proj")  # called as modules on every path (see the docstring)


def check_dropout(name: str, module: str, cfg: LoraConfig) -> None:
    if cfg.dropout > 0 and module not in DROPOUT_MODULES:
        raise MethodError(f"{name}.dropout {cfg.dropout}: LoRA dropout is supported on "
                          f"{', '.join(DROPOUT_MODULES)} only ({module} is not called as a module on every path)")
    if cfg.dropout > 0 and cfg.dora:
        raise MethodError(f"{name}.dropout {cfg.dropout}: dropout with dora is not supported; set dropout: 0")


def add_lora(module: Any, cfg: LoraConfig, start: int = 0, stop: int | None = None,
             where: str = "") -> LoraDelta:
    """Parametrise ``module.weight`` with a LoRA (or DoRA) delta on output rows [start, stop); returns it."""
    weight = module.weight
    out_f, in_f = weight.shape[0], weight[0].numel()
    stop = out_f if stop is None else stop
    if cfg.rank > min(stop - start, in_f):
        raise MethodError(f"rank {cfg.rank} exceeds the adapted block's smaller side {min(stop - start, in_f)} "
                          f"({where})")
    delta = LoraDelta(out_f, in_f, cfg.rank, cfg.effective_scale, start, stop,
                      dora_init=weight if cfg.dora else None).to(weight.device)
    parametrize.register_parametrization(module, "weight", delta)
    if cfg.dropout > 0:
        delta.dropout.p = cfg.dropout
        module.register_forward_hook(delta.dropout_hook)
    return delta


def lora_params(delta: LoraDelta) -> list[nn.Parameter]:
    return [delta.lora_A, delta.lora_B] + ([delta.magnitude] if delta.magnitude is not None else [])


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
        check_dropout(self.name, self.module, cfg)
        dims = ModelDims.from_config(lm.config)
        start, stop = self.rows(dims)
        params = []
        for i, mixer in enumerate(mixers(lm)):
            where = f"{self.name}: backbone.layers.{i}.mixer.{self.module}"
            params += lora_params(add_lora(getattr(mixer, self.module), cfg, start, stop, where))
        return params


class EmbeddingLora:
    """LoRA on ``backbone.embeddings.weight`` [V, D] (model-level): W' = W + s B A with B [V, r] ~ N(0, 1) and
    A [r, D] zero (MambaPEFT's ``EmbedAdapter``), so every token's row moves through the shared A. When
    ``lm_head`` is tied to the embeddings it is parametrised with the same delta, so both read W' and the merged
    checkpoint stays tied."""

    name = "lora_embeddings"
    mergeable = True

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        return cfg.rank * (dims.V + dims.D) + (dims.V if cfg.dora else 0)

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        check_dropout(self.name, "embeddings", cfg)
        embeddings = lm.get_submodule("backbone.embeddings")
        head = getattr(lm, "lm_head", None)
        tied = head is not None and stored(head, "weight") is stored(embeddings, "weight")
        delta = add_lora(embeddings, cfg, where=f"{self.name}: backbone.embeddings")
        with torch.no_grad():
            delta.lora_B.normal_()
            delta.lora_A.zero_()
        if tied:
            assert head is not None
            parametrize.register_parametrization(head, "weight", delta)
        return lora_params(delta)


class LoraPreset:
    """Several LoRA methods applied with one config, counted and saved as one method."""

    mergeable = True

    def __init__(self, name: str, members: list[Lora | EmbeddingLora]) -> None:
        self.name, self.members = name, members

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        return sum(m.count(cfg, dims) for m in self.members)

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        return [p for m in self.members for p in m.apply(lm, cfg)]


def _lora_methods() -> list[Lora | EmbeddingLora | LoraPreset]:
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

    def k(m: ModelDims) -> int:
        return m.K

    in_proj, out_proj = Lora("lora_in_proj", "in_proj", d, two_e), Lora("lora_out_proj", "out_proj", e, d)
    x_proj, embeddings = Lora("lora_x_proj", "x_proj", e, x_rows), EmbeddingLora()
    return [
        in_proj,
        Lora("lora_in_proj_x", "in_proj", d, two_e, lambda m: (0, m.E)),
        Lora("lora_in_proj_z", "in_proj", d, two_e, lambda m: (m.E, 2 * m.E)),
        x_proj,
        Lora("lora_x_proj_dt", "x_proj", e, x_rows, lambda m: (0, m.R)),
        Lora("lora_x_proj_b", "x_proj", e, x_rows, lambda m: (m.R, m.R + m.N)),
        Lora("lora_x_proj_c", "x_proj", e, x_rows, lambda m: (m.R + m.N, m.R + 2 * m.N)),
        Lora("lora_dt_proj", "dt_proj", r, e),
        out_proj,
        Lora("lora_conv1d", "conv1d", k, e),
        embeddings,
        # Halloran et al.'s target set (MambaPEFT's "SLL LoRA"): in_proj, out_proj, x_proj and the embeddings.
        LoraPreset("lora_halloran", [in_proj, out_proj, x_proj, embeddings]),
    ]


LORA_METHODS = _lora_methods()
