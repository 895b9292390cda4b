"""The shape every PEFT method module shares, and the helpers they use.

A method is applied through ``torch.nn.utils.parametrize``: the adapted tensor (``in_proj.weight``,
``A_log``, ...) becomes ``original + delta`` wherever it is read, so no execution path (the torch reference
scan, mambapy, or code that passes ``.weight`` straight to a kernel) can bypass it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn
from torch.nn.utils import parametrize


@dataclass(frozen=True)
class ModelDims:
    """The Mamba-1 sizes a closed-form parameter count needs (notation of peft-methods.md)."""

    D: int  # hidden_size
    E: int  # intermediate_size (expand * D)
    N: int  # state_size
    R: int  # time_step_rank
    K: int  # conv_kernel
    L: int  # num_hidden_layers
    V: int  # vocab_size

    @classmethod
    def from_config(cls, config) -> ModelDims:  # a transformers MambaConfig
        return cls(D=config.hidden_size, E=config.intermediate_size, N=config.state_size,
                   R=config.time_step_rank, K=config.conv_kernel, L=config.num_hidden_layers,
                   V=config.vocab_size)


class Method(Protocol):
    """One PEFT method: its name, closed-form count, and how it changes a model."""

    name: str
    mergeable: bool

    def count(self, cfg: Any, dims: ModelDims) -> int: ...

    def apply(self, lm: Any, cfg: Any) -> list[nn.Parameter]:
        """Add the method's tensors to ``lm`` (a MambaForCausalLM) and return them (trainable)."""
        ...


class MethodError(ValueError):
    """A method cannot be applied to this model; the message names the method and module."""


def stored(module: nn.Module, name: str) -> Any:
    """The tensor stored under any parametrisations of ``module.<name>`` (a tied weight is one stored tensor read
    by two modules; additional-scan's enlarged A_log keeps the pretrained [E, N] one)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original  # type: ignore[union-attr,index]
    return getattr(module, name)


def mixers(lm: nn.Module) -> list[Any]:
    layers = getattr(getattr(lm, "backbone", None), "layers", None)
    if layers is None:
        raise MethodError(f"{type(lm).__name__} has no backbone.layers: not a Mamba-1 model")
    out = [layer.mixer for layer in layers]
    for i, m in enumerate(out):
        for attr in ("in_proj", "x_proj", "dt_proj", "out_proj", "A_log", "D"):
            if not hasattr(m, attr):
                raise MethodError(f"backbone.layers.{i}.mixer has no {attr}: not a Mamba-1 mixer")
    return out
