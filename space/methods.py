"""The search space of each PEFT method: what space.yaml may say about it, and the concrete config a
trial receives. One entry per method in ``METHOD_SPACES``; the implementations live in ``trials.methods``.

Every method space has ``enabled`` (true, false or ``search``) plus its hyperparameters, each a constant or
searchable, and per-method learning-rate and weight-decay multipliers as in the MambaPEFT recipe.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from space.params import SearchBool, SearchFloat, SearchInt, Strict, Suggester, bounded, resolve

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


class LoraSpace(MethodSpace):
    """LoRA on one weight (or a block of its output rows): W' = W + scale * B A, B zero-initialised.
    With ``dora`` the adapted rows are re-normalised and scaled by a learned magnitude (DoRA)."""

    rank: Annotated[SearchInt, bounded(int, ge=1)] = 4
    scale: Annotated[SearchFloat, bounded(float, gt=0)] = 1.0
    dora: Annotated[SearchBool, bounded(bool)] = False
    weight_decay_mult: DecayMult = 0.0


class LoraConfig(MethodConfig):
    rank: int = Field(default=4, ge=1)
    scale: float = Field(default=1.0, gt=0)
    dora: bool = False
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


_LORA = (LoraSpace, LoraConfig)
_DELTA = (DeltaSpace, DeltaConfig)

METHOD_SPACES: dict[str, tuple[type[MethodSpace], type[MethodConfig]]] = {
    "lora_in_proj": _LORA,  # all 2E rows of in_proj
    "lora_in_proj_x": _LORA,  # the x half (rows 0..E-1): MambaPEFT's LoRA_p(X)
    "lora_in_proj_z": _LORA,  # the z (gate) half: LoRA_p(Z)
    "lora_x_proj": _LORA,  # all R + 2N rows of x_proj
    "lora_x_proj_dt": _LORA,  # the dt rows of x_proj: LoRA_p(d)
    "lora_x_proj_b": _LORA,  # the B rows: LoRA_p(B)
    "lora_x_proj_c": _LORA,  # the C rows: LoRA_p(C)
    "lora_dt_proj": _LORA,
    "lora_out_proj": _LORA,
    "a_log_delta": _DELTA,  # A-tuning
    "d_delta": _DELTA,  # D-tuning
    "conv1d_delta": _DELTA,  # conv1d-tuning (the weight)
    "dt_bias_delta": (BiasDeltaSpace, BiasDeltaConfig),  # bias-tuning (dt_proj.bias)
    "parallel_adapter": (AdapterSpace, AdapterConfig),  # beside out_proj; not mergeable
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
