"""LoRA (Hu et al. 2021) on the SSM mixers' projections, and MambaPEFT's partial LoRA on named blocks of their
output rows (Yoshimura et al. 2025: LoRA_p(X), LoRA_p(Z) on in_proj; LoRA_p(d), LoRA_p(B), LoRA_p(C) on Mamba-1's
x_proj, which on Mamba-2 are the b, c and dt blocks of in_proj: ``lora_in_proj_b`` / ``_c`` / ``_dt``). The blocks
are the mixer kind's (``trials.models``): Mamba-1 in_proj = x | z, x_proj = dt | B | C; Mamba-2 in_proj =
z | x | B | C | dt. A target the kind lacks (x_proj or dt_proj on Mamba-2) is refused with the counterpart to use.
On hybrids, LoRA on the attention (q, k, v, o) and MLP (gate, up, down) projections too, and on MoE experts
stored as one fused tensor, one delta per expert (``lora_moe_gate`` / ``_up`` / ``_down``).

W' = W + scale * pad(B A) with A [r, in] Kaiming-uniform (as ``nn.Linear`` initialises) and B [rows, r] zeros,
padded with zero rows outside the targeted block, so the model is unchanged at init. The delta is applied as a
parametrisation of the weight, so every path that reads ``weight`` (module calls, transformers' direct
``dt_proj.weight @ ...``, the fused CUDA kernel) sees W'. Trainable per layer: r (in + rows), plus ``rows``
magnitudes with DoRA. Mergeable: W <- W'.

Also here: LoRA on the depthwise ``conv1d`` (its [C, 1, K] kernel read as a [C, K] matrix, so r <= K), LoRA on
the embeddings (model-level; MambaPEFT's ``EmbedAdapter`` init: the vocabulary side N(0, 1), the hidden side
zero; a tied ``lm_head`` reads the same adapted matrix), and the Halloran-style preset (LoRA on in_proj, out_proj,
x_proj and the embeddings with one config).

LoRA dropout (``dropout > 0``) acts on the adapter's input only, as in peft: out = W x + s B A drop(x). The weight
stays W + s B A; a forward hook adds s B A (drop(x) - x) while training. It needs the module to be called as a
module on every path (the kind's ``hookable`` projections: Mamba-1's in_proj, x_proj, out_proj, Mamba-2's
in_proj, every side target); elsewhere (dt_proj, Mamba-2's out_proj, which the fused kernel takes as a weight,
conv1d, the embeddings) dropout is refused, as with DoRA, whose row norm would need the dropped input too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from space.methods import LoraConfig
from trials.methods.base import MethodError, OnRows, layout, mixers, stored
from trials.models.interface import Architecture, ModelDims, architecture, architecture_of


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


def dropout_refusal(name: str, where: str, hookable: bool, cfg: LoraConfig) -> str | None:
    """LoRA dropout runs as a forward hook, so only on a layer called as a module on every path (``hookable``)."""
    if cfg.dropout > 0 and not hookable:
        return (f"{name}.dropout {cfg.dropout}: {where} is not called as a module on every path (its weight is read "
                "directly), so LoRA dropout there would be skipped; set dropout: 0")
    if cfg.dropout > 0 and cfg.dora:
        return f"{name}.dropout {cfg.dropout}: dropout with dora is not supported; set dropout: 0"
    return None


def rank_refusal(cfg: LoraConfig, rows: int, in_features: int, where: str) -> str | None:
    if cfg.rank > min(rows, in_features):
        return f"rank {cfg.rank} exceeds the adapted block's smaller side {min(rows, in_features)} ({where})"
    return None


def lora_refusal(name: str, where: str, cfg: LoraConfig, rows: int, in_features: int, hookable: bool) -> str | None:
    """Why ``cfg`` cannot adapt a block of ``rows`` x ``in_features`` at ``where``, or None."""
    return dropout_refusal(name, where, hookable, cfg) or rank_refusal(cfg, rows, in_features, f"{name}: {where}")


def check_dropout(name: str, where: str, hookable: bool, cfg: LoraConfig) -> None:
    reason = dropout_refusal(name, where, hookable, cfg)
    if reason:
        raise MethodError(reason)


def add_lora(module: Any, cfg: LoraConfig, start: int = 0, stop: int | None = None,
             where: str = "") -> LoraDelta:
    """Parametrise ``module.weight`` with a LoRA (or DoRA) delta on output rows [start, stop); returns it."""
    weight = module.weight
    out_f, in_f = weight.shape[0], weight[0].numel()
    stop = out_f if stop is None else stop
    reason = rank_refusal(cfg, stop - start, in_f, where)
    if reason:
        raise MethodError(reason)
    delta = LoraDelta(out_f, in_f, cfg.rank, cfg.effective_scale, start, stop,
                      dora_init=weight if cfg.dora else None).to(weight.device)
    parametrize.register_parametrization(module, "weight", delta)
    if cfg.dropout > 0:
        delta.dropout.p = cfg.dropout
        module.register_forward_hook(delta.dropout_hook)
    return delta


def lora_params(delta: LoraDelta) -> list[nn.Parameter]:
    return [delta.lora_A, delta.lora_B] + ([delta.magnitude] if delta.magnitude is not None else [])


class Lora(OnRows):
    """LoRA on a projection of every SSM mixer, on all its output rows or on one named block of them."""

    mergeable = True

    def check(self, cfg: LoraConfig, dims: ModelDims) -> str | None:
        """Why ``cfg`` cannot be applied to a model of these sizes (rank, dropout), or None."""
        start, stop = self._rows(dims.mixer)
        proj = dims.mixer.projection(self.projection)
        return lora_refusal(self.name, f"mixer.{self.projection}", cfg, stop - start, proj.in_features, proj.hookable)

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        start, stop = self._rows(dims.mixer)
        magnitude = stop - start if cfg.dora else 0
        return dims.L * (cfg.rank * (dims.mixer.projection(self.projection).in_features + stop - start) + magnitude)

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        params = []
        for mixer in mixers(lm):
            where = f"{self.name}: {mixer.path}.{self.projection}"
            check_dropout(self.name, f"{mixer.path}.{self.projection}",
                          mixer.spec.projection(self.projection).hookable, cfg)
            start, stop = self._rows(mixer.spec)
            params += lora_params(add_lora(mixer.projection(self.projection), cfg, start, stop, where))
        return params


class ConvLora(Lora):
    """LoRA on the depthwise conv1d kernel [C, 1, K] read as a [C, K] matrix (r <= K): C = E on Mamba-1, the
    x | B | C channels on Mamba-2."""

    def __init__(self) -> None:
        super().__init__("lora_conv1d", "conv1d")

    def refusal(self, arch: Architecture) -> str | None:
        return None if layout(arch).has_tensor("conv_weight") else f"a {arch.kind} mixer has no conv1d"

    def check(self, cfg: LoraConfig, dims: ModelDims) -> str | None:
        c, k = dims.mixer.conv_channels, dims.mixer.conv_kernel
        return lora_refusal(self.name, "mixer.conv1d", cfg, c, k, hookable=False)

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        c, k = dims.mixer.conv_channels, dims.mixer.conv_kernel
        return dims.L * (cfg.rank * (k + c) + (c if cfg.dora else 0))

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        params = []
        for mixer in mixers(lm):
            check_dropout(self.name, f"{mixer.path}.conv1d", False, cfg)
            conv, _ = mixer.owner("conv_weight")
            params += lora_params(add_lora(conv, cfg, where=f"{self.name}: {mixer.path}.conv1d"))
        return params


class SideLora:
    """LoRA on a hybrid's attention or MLP projection (``trials.models.hybrid``'s side targets) in every layer that
    has it; a block of rows where the weight is fused (Granite's gate | up)."""

    mergeable = True

    def __init__(self, name: str, target: str) -> None:
        self.name, self.target = name, target

    def refusal(self, arch: Architecture) -> str | None:
        family = "attention" if self.target.startswith("attn") else "MLP"
        has = arch.attention if family == "attention" else arch.mlp
        if not has:
            return f"{arch.model_type} has no {family} layers ({self.target} exists on hybrids only)"
        if self.target in arch.lacks:
            return f"{arch.model_type}'s {family} has no {self.target.partition('_')[2]} projection"
        return None

    def check(self, cfg: LoraConfig, dims: ModelDims) -> str | None:
        t = dims.side_target(self.target)
        if t is None:
            return None
        start, stop = t.rows or (0, t.out_features)
        return lora_refusal(self.name, self.target, cfg, stop - start, t.in_features, hookable=True)

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        t = dims.side_target(self.target)
        if t is None:
            return 0
        start, stop = t.rows or (0, t.out_features)
        return t.count * (cfg.rank * (t.in_features + stop - start) + (stop - start if cfg.dora else 0))

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        from trials.models.hybrid import side_modules

        found = side_modules(lm, self.target)
        if not found:
            raise MethodError(f"{self.name}: {type(lm).__name__} has no {self.target} projection")
        params = []
        for path, module, (start, stop) in found:
            params += lora_params(add_lora(module, cfg, start, stop, where=f"{self.name}: {path}"))
        return params


class ExpertLoraDelta(nn.Module):
    """Parametrisation W -> W + scale * B_e A_e per expert of a fused [experts, out, in] weight, on output rows
    [start, stop) of each expert; with ``dora_init``, DoRA per expert and output row (as ``LoraDelta``)."""

    def __init__(self, weight: torch.Tensor, rank: int, scale: float, start: int, stop: int, dora: bool) -> None:
        super().__init__()
        n, out_f, in_f = weight.shape
        self.scale, self.start, self.stop = scale, start, stop
        self.pad = (0, 0, start, out_f - stop)
        self.lora_A = nn.Parameter(torch.empty(n, rank, in_f))  # [n, r, in]
        self.lora_B = nn.Parameter(torch.zeros(n, stop - start, rank))  # [n, rows, r]
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.magnitude: nn.Parameter | None = None
        if dora:
            self.magnitude = nn.Parameter(weight.detach()[:, start:stop].float().norm(dim=2))  # [n, rows]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = self.scale * (self.lora_B @ self.lora_A)  # [n, rows, in]
        if self.magnitude is None:
            return weight + F.pad(delta, self.pad).to(weight.dtype)  # [n, out, in]
        rows = weight[:, self.start : self.stop] + delta.to(weight.dtype)  # [n, rows, in]
        rows = rows * (self.magnitude / rows.norm(dim=2).detach()).to(weight.dtype)[..., None]
        return torch.cat([weight[:, : self.start], rows, weight[:, self.stop :]], dim=1)  # [n, out, in]


class ExpertLora:
    """LoRA on each MoE expert's projection where the experts are stored as one fused tensor per layer (Granite
    4.0's ``experts.gate_up_proj`` / ``down_proj``): one low-rank delta per expert, through ``parametrize``, so
    whichever experts kernel runs reads the adapted tensor. No dropout (the tensor is read, not called)."""

    mergeable = True

    def __init__(self, name: str, target: str) -> None:
        self.name, self.target = name, target

    def refusal(self, arch: Architecture) -> str | None:
        return None if arch.moe else f"{arch.model_type} has no MoE experts ({self.target} exists on MoE hybrids only)"

    def check(self, cfg: LoraConfig, dims: ModelDims) -> str | None:
        t = dims.side_target(self.target)
        if t is None:
            return None
        start, stop = t.rows or (0, t.out_features)
        return lora_refusal(self.name, f"the experts' {self.target}", cfg, stop - start, t.in_features, hookable=False)

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        t = dims.side_target(self.target)
        if t is None:
            return 0
        start, stop = t.rows or (0, t.out_features)
        return t.count * t.experts * (cfg.rank * (t.in_features + stop - start) + (stop - start if cfg.dora else 0))

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        from trials.models.hybrid import expert_tensors

        found = expert_tensors(lm, self.target)
        if not found:
            raise MethodError(f"{self.name}: {type(lm).__name__} has no MoE experts (num_local_experts is 0?)")
        params = []
        for path, module, attr, (start, stop) in found:
            weight = getattr(module, attr)
            reason = lora_refusal(self.name, f"{path}.{attr}", cfg, stop - start, weight.shape[2], hookable=False)
            if reason:
                raise MethodError(reason)
            delta = ExpertLoraDelta(weight, cfg.rank, cfg.effective_scale, start, stop, cfg.dora).to(weight.device)
            parametrize.register_parametrization(module, attr, delta)
            params += [delta.lora_A, delta.lora_B] + ([delta.magnitude] if delta.magnitude is not None else [])
        return params


class EmbeddingLora:
    """LoRA on ``backbone.embeddings.weight`` [V, D] (model-level): W' = W + s B A with B [V, r] ~ N(0, 1) and
    A [r, D] zero (MambaPEFT's ``EmbedAdapter``), so every token's row moves through the shared A. When
    ``lm_head`` is tied to the embeddings it is parametrised with the same delta, so both read W' and the merged
    checkpoint stays tied."""

    name = "lora_embeddings"
    mergeable = True

    def refusal(self, arch: Architecture) -> str | None:
        return None

    def check(self, cfg: LoraConfig, dims: ModelDims) -> str | None:
        return lora_refusal(self.name, "the embeddings", cfg, dims.V, dims.D, hookable=False)

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        return cfg.rank * (dims.V + dims.D) + (dims.V if cfg.dora else 0)

    def apply(self, lm: Any, cfg: LoraConfig) -> list[nn.Parameter]:
        check_dropout(self.name, "the embeddings", False, cfg)
        embeddings = lm.get_input_embeddings()
        head = lm.get_output_embeddings()
        tied = head is not None and stored(head, "weight") is stored(embeddings, "weight")
        delta = add_lora(embeddings, cfg, where=f"{self.name}: the input embeddings")
        with torch.no_grad():
            delta.lora_B.normal_()
            delta.lora_A.zero_()
        if tied:
            assert head is not None
            parametrize.register_parametrization(head, "weight", delta)
        return lora_params(delta)


class LoraPreset:
    """Several LoRA methods applied with one config, counted and saved as one method. A member the architecture
    lacks is left out (on Mamba-2, x_proj's dt | B | C rows are already blocks of in_proj, so Halloran's set is
    in_proj, out_proj and the embeddings there)."""

    mergeable = True

    def __init__(self, name: str, members: list[Lora | EmbeddingLora]) -> None:
        self.name, self.members = name, members

    def _present(self, arch: Architecture) -> list[Lora | EmbeddingLora]:
        return [m for m in self.members if m.refusal(arch) is None]

    def refusal(self, arch: Architecture) -> str | None:
        return None if self._present(arch) else f"none of {[m.name for m in self.members]} applies to {arch.kind}"

    def check(self, cfg: LoraConfig, dims: ModelDims) -> str | None:
        return next((r for m in self._present(architecture_of(dims.model_type)) if (r := m.check(cfg, dims))), None)

    def count(self, cfg: LoraConfig, dims: ModelDims) -> int:
        return sum(m.count(cfg, dims) for m in self._present(architecture_of(dims.model_type)))

    def apply(self, lm: nn.Module, cfg: LoraConfig) -> list[nn.Parameter]:
        return [p for m in self._present(architecture(lm)) for p in m.apply(lm, cfg)]


_M1 = ": on Mamba-2 B, C and dt are blocks of in_proj (use lora_in_proj_b, lora_in_proj_c, lora_in_proj_dt)"
_DT = ": on Mamba-2 dt is per head, a block of in_proj (use lora_in_proj_dt; dt_bias_delta tunes its bias)"
_M2 = ": on Mamba-1 in_proj holds x and z only, and B, C and dt come from x_proj (use lora_x_proj_{})"


def _lora_methods() -> list[Lora | EmbeddingLora | LoraPreset | SideLora | ExpertLora]:
    in_proj, out_proj = Lora("lora_in_proj", "in_proj"), Lora("lora_out_proj", "out_proj")
    x_proj, embeddings = Lora("lora_x_proj", "x_proj", instead=_M1), EmbeddingLora()
    return [
        in_proj,
        Lora("lora_in_proj_x", "in_proj", "x"),
        Lora("lora_in_proj_z", "in_proj", "z"),
        Lora("lora_in_proj_b", "in_proj", "b", instead=_M2.format("b")),
        Lora("lora_in_proj_c", "in_proj", "c", instead=_M2.format("c")),
        Lora("lora_in_proj_dt", "in_proj", "dt", instead=_M2.format("dt")),
        x_proj,
        Lora("lora_x_proj_dt", "x_proj", "dt", instead=_M1),
        Lora("lora_x_proj_b", "x_proj", "b", instead=_M1),
        Lora("lora_x_proj_c", "x_proj", "c", instead=_M1),
        Lora("lora_dt_proj", "dt_proj", instead=_DT),
        out_proj,
        ConvLora(),
        embeddings,
        # Halloran et al.'s target set (MambaPEFT's "SLL LoRA"): in_proj, out_proj, x_proj and the embeddings.
        LoraPreset("lora_halloran", [in_proj, out_proj, x_proj, embeddings]),
        *(SideLora(f"lora_{t}", t) for t in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up",
                                              "mlp_down")),
        *(ExpertLora(f"lora_{t}", t) for t in ("moe_gate", "moe_up", "moe_down")),
    ]


LORA_METHODS = _lora_methods()
