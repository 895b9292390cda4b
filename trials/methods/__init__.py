"""PEFT methods for Mamba-1: one module per method, listed in ``REGISTRY``; the public API to apply a
combination to any Hugging Face Mamba model, count it, merge it, save and load it."""

from __future__ import annotations

from trials.methods.api import (
    AppliedMethods,
    apply_methods,
    count_params,
    load_adapters,
    merge_methods,
    save_adapters,
)
from trials.methods.base import Method, MethodError, ModelDims
from trials.methods.lora import LORA_METHODS, Lora, LoraDelta
from trials.methods.partial import PARTIAL_METHODS, AdditiveDelta, PartialDelta
from trials.methods.registry import APPLY_ORDER, REGISTRY

__all__ = ["APPLY_ORDER", "LORA_METHODS", "PARTIAL_METHODS", "REGISTRY", "AdditiveDelta", "AppliedMethods", "Lora",
           "LoraDelta", "Method", "MethodError", "ModelDims", "PartialDelta", "apply_methods", "count_params",
           "load_adapters", "merge_methods", "save_adapters"]
