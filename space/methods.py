"""The search space of each PEFT method: what space.yaml may say about it, and the concrete config a
trial receives. One entry per method in ``METHOD_SPACES``; the implementations live in ``trials.methods``.

Every method space has ``enabled`` (true, false or ``search``) plus its hyperparameters, each a constant or
searchable, and per-method learning-rate and weight-decay multipliers as in the MambaPEFT recipe.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from space.params import SearchFloat, SearchInt, Strict, Suggester, bounded, resolve

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


class LoraInProjSpace(MethodSpace):
    """LoRA on ``mixer.in_proj`` (all 2E output rows): W' = W + scale * B A, B zero-initialised."""

    rank: Annotated[SearchInt, bounded(int, ge=1)] = 4
    scale: Annotated[SearchFloat, bounded(float, gt=0)] = 1.0
    weight_decay_mult: DecayMult = 0.0


class LoraInProjConfig(MethodConfig):
    rank: int = Field(default=4, ge=1)
    scale: float = Field(default=1.0, gt=0)
    weight_decay_mult: float = Field(default=0.0, ge=0)


class ALogDeltaSpace(MethodSpace):
    """Partial tuning of A: a zero-initialised additive delta on ``mixer.A_log`` [E, N]; its weight decay
    (amplified by ``weight_decay_mult``) pulls A back toward the pretrained value."""

    weight_decay_mult: DecayMult = 10.0


class ALogDeltaConfig(MethodConfig):
    weight_decay_mult: float = Field(default=10.0, ge=0)


METHOD_SPACES: dict[str, tuple[type[MethodSpace], type[MethodConfig]]] = {
    "lora_in_proj": (LoraInProjSpace, LoraInProjConfig),
    "a_log_delta": (ALogDeltaSpace, ALogDeltaConfig),
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
