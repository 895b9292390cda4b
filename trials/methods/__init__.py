"""PEFT methods for Mamba-1, Mamba-2 and hybrids: one module per method, listed in ``REGISTRY``; the public API to
apply a combination to a supported Hugging Face model, count it, merge it, save and load it; which method applies
to which architecture (``supported``, ``support_table``)."""

from __future__ import annotations

from trials.methods.api import (
    AppliedMethods,
    apply_methods,
    config_refusals,
    count_params,
    load_adapters,
    merge_methods,
    save_adapters,
)
from trials.methods.base import Method, MethodError, Prepared, WarmUp
from trials.methods.lora import LORA_METHODS, Lora, LoraDelta
from trials.methods.partial import PARTIAL_METHODS, AdditiveDelta, MixerDelta
from trials.methods.registry import APPLY_ORDER, REGISTRY, support_table, supported
from trials.models.interface import ModelDims

__all__ = ["APPLY_ORDER", "LORA_METHODS", "PARTIAL_METHODS", "REGISTRY", "AdditiveDelta", "AppliedMethods", "Lora",
           "LoraDelta", "Method", "MethodError", "MixerDelta", "ModelDims", "Prepared", "WarmUp", "apply_methods",
           "config_refusals", "count_params", "load_adapters", "merge_methods", "save_adapters", "support_table",
           "supported"]
