"""PEFT methods for Mamba-1: one module per method, listed in ``REGISTRY``; the public API to apply a
combination to any Hugging Face Mamba model, count it, merge it, save and load it."""

from __future__ import annotations

from trials.methods.a_log_delta import ALogDelta
from trials.methods.api import (
    AppliedMethods,
    apply_methods,
    count_params,
    load_adapters,
    merge_methods,
    save_adapters,
)
from trials.methods.base import Method, MethodError, ModelDims
from trials.methods.lora_in_proj import LoraInProj
from trials.methods.registry import APPLY_ORDER, REGISTRY

__all__ = ["ALogDelta", "APPLY_ORDER", "AppliedMethods", "LoraInProj", "Method", "MethodError", "ModelDims",
           "REGISTRY", "apply_methods", "count_params", "load_adapters", "merge_methods", "save_adapters"]
