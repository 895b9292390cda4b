"""The search space of each PEFT method: what space.yaml may say about it, and the concrete config a
trial receives. One entry per method in ``METHOD_SPACES``; the implementations live in ``trials.methods``.

Every method space has ``enabled`` (true, false or ``search``) plus its hyperparameters, each a constant or
searchable, and per-method learning-rate and weight-decay multipliers as in the MambaPEFT recipe.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from space.params import SearchBool, SearchFloat, SearchInt, SearchStr, Strict, Suggester, bounded, one_of, resolve

Enabled = bool | Literal["search"]
LrMult = Annotated[SearchFloat, bounded(float, gt=0)]
DecayMult = Annotated[SearchFloat, bounded(float, ge=0)]


class MethodSpace(Strict):
    enabled: Enabled = "search"
    lr_mult: LrMult = 1.0
    weight_decay_mult: DecayMult = 1.0


class MethodConfig(Strict):
    lr_mult: float = Field(default=1.0, gt=0)
    weight_decay_mult: float = Field(default=1.0, ge=0)


Rank = Annotated[SearchInt, bounded(int, ge=1)]
Scale = Annotated[SearchFloat, bounded(float, gt=0)]
Dropout = Annotated[SearchFloat, bounded(float, ge=0, le=0.9)]
Tokens = Annotated[SearchInt, bounded(int, ge=1)]


class LoraSpace(MethodSpace):
    """LoRA on one weight (or a block of its output rows): W' = W + scale * B A, B zero-initialised.
    ``alpha``, when given, sets scale = alpha / rank (peft's convention) and overrides ``scale`` (MambaPEFT's
    fixed s). ``dropout`` drops the adapter's input (in_proj, x_proj, out_proj targets). With ``dora`` the
    adapted rows are re-normalised and scaled by a learned magnitude (DoRA)."""

    rank: Rank = 4
    scale: Scale = 1.0
    alpha: Scale | None = None
    dropout: Dropout = 0.0
    dora: Annotated[SearchBool, bounded(bool)] = False
    weight_decay_mult: DecayMult = 0.0


class LoraConfig(MethodConfig):
    rank: int = Field(default=4, ge=1)
    scale: float = Field(default=1.0, gt=0)
    alpha: float | None = Field(default=None, gt=0)
    dropout: float = Field(default=0.0, ge=0, le=0.9)
    dora: bool = False
    weight_decay_mult: float = Field(default=0.0, ge=0)

    @property
    def effective_scale(self) -> float:
        return self.scale if self.alpha is None else self.alpha / self.rank


class ProdialSpace(MethodSpace):
    """ProDiaL (Ham et al. 2025) on in_proj or out_proj: W' = diag(s) W T + scale * B A with
    T = I + blockdiag(R_1..R_b) (blocks of ``block_size`` input features, zero-init), s ones-init, LoRA part
    of ``rank``. ``block_size`` must divide the weight's input size."""

    block_size: Annotated[SearchInt, bounded(int, ge=1)] = 16
    rank: Rank = 8
    scale: Scale = 1.0
    weight_decay_mult: DecayMult = 0.0


class ProdialConfig(MethodConfig):
    block_size: int = Field(default=16, ge=1)
    rank: int = Field(default=8, ge=1)
    scale: float = Field(default=1.0, gt=0)
    weight_decay_mult: float = Field(default=0.0, ge=0)


Position = Literal["prefix", "suffix", "prefix_suffix"]


class PromptSpace(MethodSpace):
    """Prompt tuning: ``tokens`` learned input embeddings at each of the ``position`` sites (prefix, suffix
    or both), optionally produced through a Linear-Tanh-Linear ``projection``."""

    tokens: Tokens = 4
    position: Annotated[SearchStr, one_of("prefix", "suffix", "prefix_suffix")] = "prefix"
    projection: Annotated[SearchBool, bounded(bool)] = False
    weight_decay_mult: DecayMult = 0.0


class PromptConfig(MethodConfig):
    tokens: int = Field(default=4, ge=1)
    position: Position = "prefix"
    projection: bool = False
    weight_decay_mult: float = Field(default=0.0, ge=0)


class AffixSpace(MethodSpace):
    """Affix tuning (MambaPEFT): ``tokens`` learned positions per layer prepended to the x half of in_proj's
    output before conv1d and dropped after the scan; optionally produced through a ``projection``."""

    tokens: Tokens = 3
    projection: Annotated[SearchBool, bounded(bool)] = False
    weight_decay_mult: DecayMult = 0.0


class AffixConfig(MethodConfig):
    tokens: int = Field(default=3, ge=1)
    projection: bool = False
    weight_decay_mult: float = Field(default=0.0, ge=0)


class AdditionalScanSpace(MethodSpace):
    """Additional-scan (MambaPEFT): ``states`` extra state dimensions per layer with their own A (copied from
    the existing A's last column) and B/C rows of x_proj."""

    states: Annotated[SearchInt, bounded(int, ge=1)] = 4
    weight_decay_mult: DecayMult = 0.0


class AdditionalScanConfig(MethodConfig):
    states: int = Field(default=4, ge=1)
    weight_decay_mult: float = Field(default=0.0, ge=0)


class InitialStateSpace(MethodSpace):
    """Initial-state tuning (ssm-peft): a learned SSM state h0 [E, N] per layer, zero-init; with
    ``conv_state`` also the K-1 positions the causal conv1d starts from."""

    conv_state: Annotated[SearchBool, bounded(bool)] = False
    weight_decay_mult: DecayMult = 0.0


class InitialStateConfig(MethodConfig):
    conv_state: bool = False
    weight_decay_mult: float = Field(default=0.0, ge=0)


class ZeroDecaySpace(MethodSpace):
    weight_decay_mult: DecayMult = 0.0


class ZeroDecayConfig(MethodConfig):
    weight_decay_mult: float = Field(default=0.0, ge=0)


class DeltaSpace(MethodSpace):
    """Partial tuning: a zero-initialised additive delta on one tensor (A_log, D, conv1d weight, dt bias). Its
    weight decay (amplified by ``weight_decay_mult``, 10 in the reference recipe) acts on the delta, pulling
    the tensor back toward its pretrained value rather than toward zero."""

    weight_decay_mult: DecayMult = 10.0


class DeltaConfig(MethodConfig):
    weight_decay_mult: float = Field(default=10.0, ge=0)


class BiasDeltaSpace(DeltaSpace):
    weight_decay_mult: DecayMult = 100.0  # the reference recipe's bias-tuning decay


class BiasDeltaConfig(DeltaConfig):
    weight_decay_mult: float = Field(default=100.0, ge=0)


class AdapterSpace(MethodSpace):
    """Parallel adapter beside ``out_proj`` (AdaptFormer-style, MambaPEFT's ParallelAdapter):
    out += scale * Up(Dropout(ReLU(Down(y)))), Up zero-initialised."""

    rank: Annotated[SearchInt, bounded(int, ge=1)] = 32
    scale: Annotated[SearchFloat, bounded(float, gt=0)] = 0.1
    dropout: Annotated[SearchFloat, bounded(float, ge=0, le=0.9)] = 0.0
    weight_decay_mult: DecayMult = 1.0


class AdapterConfig(MethodConfig):
    rank: int = Field(default=32, ge=1)
    scale: float = Field(default=0.1, gt=0)
    dropout: float = Field(default=0.0, ge=0, le=0.9)


Fraction = Annotated[SearchFloat, bounded(float, ge=0, le=1)]


class SdtSpace(MethodSpace):
    """Sparse dimension tuning (SDT, the SSM half of ssm-peft's SDLoRA): a warm-up run of ``warmup_steps`` trains a
    dense delta on A_log; per layer it keeps the top E - round(freeze_channel * E) channels and, per kept channel,
    the top N - round(freeze_state * N) states; the trial then tunes zero-init deltas only on those A_log entries
    and on the kept channels' columns of x_proj's B and C rows. Fractions that keep no channel or state of the
    model are an error when the trial is built. Pair with ``lora_out_proj`` (rank 8) for SDLoRA.

    On Mamba-2 the same fields select heads and their channels (``trials.methods.sdt``): the warm-up also trains
    a conv1d delta; the top max(1, H - round(freeze_channel * H)) heads by their A_log delta are kept and, in
    each, the top P - round(freeze_state * P) channels by their conv delta; the trial tunes A_log at the kept heads
    and in_proj's x rows of the kept channels."""

    freeze_channel: Fraction = 0.99
    freeze_state: Fraction = 0.75
    warmup_steps: Annotated[SearchInt, bounded(int, ge=1)] = 250
    weight_decay_mult: DecayMult = 0.0  # as LoRA's here: only the trial's own decay, unamplified


class SdtLayer(Strict):
    """One layer's SDT selection: the kept channels and, for each, its kept A_log state indices (Mamba-2: the kept
    heads and, for each, its kept channels within the head, 0..P-1)."""

    channels: tuple[int, ...]
    states: tuple[tuple[int, ...], ...]


class SdtConfig(MethodConfig):
    freeze_channel: float = Field(default=0.99, ge=0, le=1)
    freeze_state: float = Field(default=0.75, ge=0, le=1)
    warmup_steps: int = Field(default=250, ge=1)
    weight_decay_mult: float = Field(default=0.0, ge=0)
    # One entry per layer; None until the warm-up run fills it in (trials.methods.sdt.warmup_selection). Not a
    # space field: it is learned, never searched, and checked against the model when the method is applied.
    selection: tuple[SdtLayer, ...] | None = None


_LORA = (LoraSpace, LoraConfig)
_DELTA = (DeltaSpace, DeltaConfig)

METHOD_SPACES: dict[str, tuple[type[MethodSpace], type[MethodConfig]]] = {
    "lora_in_proj": _LORA,  # all rows of in_proj (Mamba-1: x | z; Mamba-2: z | x | B | C | dt)
    "lora_in_proj_x": _LORA,  # the x block: MambaPEFT's LoRA_p(X)
    "lora_in_proj_z": _LORA,  # the z (gate) block: LoRA_p(Z)
    "lora_in_proj_b": _LORA,  # Mamba-2: the B block of in_proj (Mamba-1's B comes from x_proj)
    "lora_in_proj_c": _LORA,  # Mamba-2: the C block
    "lora_in_proj_dt": _LORA,  # Mamba-2: the dt block (one row per head)
    "lora_x_proj": _LORA,  # all R + 2N rows of x_proj
    "lora_x_proj_dt": _LORA,  # the dt rows of x_proj: LoRA_p(d)
    "lora_x_proj_b": _LORA,  # the B rows: LoRA_p(B)
    "lora_x_proj_c": _LORA,  # the C rows: LoRA_p(C)
    "lora_dt_proj": _LORA,
    "lora_out_proj": _LORA,
    "lora_conv1d": _LORA,  # the depthwise kernel read as an [E, K] matrix (rank <= K)
    "lora_embeddings": _LORA,  # model-level; a tied lm_head follows
    "lora_halloran": _LORA,  # preset: LoRA on in_proj, out_proj, x_proj (Mamba-1) and the embeddings, one config
    # Hybrids only: the attention and MLP projections of every layer that has them.
    "lora_attn_q": _LORA,
    "lora_attn_k": _LORA,
    "lora_attn_v": _LORA,
    "lora_attn_o": _LORA,
    "lora_mlp_gate": _LORA,
    "lora_mlp_up": _LORA,
    "lora_mlp_down": _LORA,
    "lora_moe_gate": _LORA,  # MoE hybrids (Granite 4.0): per-expert LoRA on the fused experts' gate rows
    "lora_moe_up": _LORA,
    "lora_moe_down": _LORA,
    "prodial_in_proj": (ProdialSpace, ProdialConfig),
    "prodial_in_proj_x": (ProdialSpace, ProdialConfig),  # one block of in_proj's rows, as the LoRA blocks
    "prodial_in_proj_z": (ProdialSpace, ProdialConfig),
    "prodial_in_proj_b": (ProdialSpace, ProdialConfig),  # Mamba-2 (and hybrids) only
    "prodial_in_proj_c": (ProdialSpace, ProdialConfig),
    "prodial_in_proj_dt": (ProdialSpace, ProdialConfig),
    "prodial_out_proj": (ProdialSpace, ProdialConfig),
    "a_log_delta": _DELTA,  # A-tuning
    "d_delta": _DELTA,  # D-tuning
    "conv1d_delta": _DELTA,  # conv1d-tuning (the weight)
    "dt_bias_delta": (BiasDeltaSpace, BiasDeltaConfig),  # bias-tuning (Mamba-1 dt_proj.bias, Mamba-2 dt_bias)
    "norm_delta": _DELTA,  # every RMSNorm weight outside the mixers (per layer and the final one)
    "gated_norm_delta": _DELTA,  # Mamba-2: the mixer's gated RMSNorm weight
    "bitfit": (BiasDeltaSpace, BiasDeltaConfig),  # conv1d and dt_proj biases (BitFit, as in ssm-peft)
    "prompt_tuning": (PromptSpace, PromptConfig),  # not mergeable
    "affix_tuning": (AffixSpace, AffixConfig),  # not mergeable; needs the project's mixer
    "additional_scan": (AdditionalScanSpace, AdditionalScanConfig),  # mergeable into a d_state N+n model
    "initial_state": (InitialStateSpace, InitialStateConfig),  # not mergeable; needs the project's mixer
    "state_offset": (ZeroDecaySpace, ZeroDecayConfig),  # not mergeable; needs the project's mixer
    "parallel_adapter": (AdapterSpace, AdapterConfig),  # beside out_proj; not mergeable
    "sdt": (SdtSpace, SdtConfig),  # sparse deltas on A_log and x_proj's B/C rows after a warm-up run
}


def sample_method(name: str, space: MethodSpace, trial: Suggester) -> MethodConfig | None:
    """The concrete config of one method for a trial, or None when the trial leaves it off."""
    on = space.enabled
    if on == "search":
        on = trial.suggest_categorical(f"{name}.enabled", [True, False])
    if not on:
        return None
    values = {
        field: resolve(getattr(space, field), f"{name}.{field}", trial)
        for field in type(space).model_fields
        if field != "enabled"
    }
    return METHOD_SPACES[name][1](**values)


def method_config(name: str, values: dict[str, Any]) -> MethodConfig:
    if name not in METHOD_SPACES:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHOD_SPACES)}")
    return METHOD_SPACES[name][1](**values)


__all__ = ["METHOD_SPACES", "MethodConfig", "MethodSpace", "method_config", "sample_method"]
