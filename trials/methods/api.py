"""Apply a combination of methods to a supported Hugging Face model (Mamba-1, Mamba-2, hybrids), count, merge,
save and load it. A method the architecture does not support is refused by name, with the reason, before anything
is changed (``trials.methods.registry.supported``).

    lm = MambaForCausalLM.from_pretrained(path)
    applied = apply_methods(lm, {"lora_in_proj": LoraConfig(rank=4), "a_log_delta": DeltaConfig()})
    applied.param_groups(lr=1e-3, weight_decay=1e-4)   # per-method lr / weight-decay multipliers
    merge_methods(lm)                                   # fold every mergeable method into the weights
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import METHOD_SPACES, MethodConfig, MethodSpace, method_config
from space.params import candidates
from trials.methods.base import MethodError
from trials.methods.registry import APPLY_ORDER, REGISTRY, supported
from trials.models.interface import HOOKS, ModelDims, architecture


@dataclass
class AppliedMethods:
    """What ``apply_methods`` added: the trainable tensors of each method and its config."""

    configs: dict[str, MethodConfig]
    params: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    def num_params(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in ps) for name, ps in self.params.items()}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """One optimiser group per method, scaled by its ``lr_mult`` and ``weight_decay_mult``."""
        return [{"params": ps, "lr": lr * self.configs[name].lr_mult,
                 "weight_decay": weight_decay * self.configs[name].weight_decay_mult, "name": name}
                for name, ps in self.params.items() if ps]


def _check_names(methods: Mapping[str, Any]) -> None:
    unknown = [n for n in methods if n not in REGISTRY]
    if unknown:
        raise MethodError(f"unknown method(s) {unknown}; implemented: {list(REGISTRY)}")


def _resized(name: str, cfg: MethodConfig, dims: ModelDims) -> ModelDims:
    """The sizes the methods applied after ``name`` see (additional-scan on Mamba-2 enlarges the state)."""
    resize = getattr(REGISTRY[name], "resize", None)
    return dims if resize is None else resize(cfg, dims)


def count_params(methods: Mapping[str, MethodConfig], dims: ModelDims) -> dict[str, int]:
    """Closed-form trainable parameters per method, from the configs and model sizes alone (each method counted
    on the sizes the methods applied before it leave)."""
    _check_names(methods)
    out = {}
    for name in APPLY_ORDER:
        if name in methods:
            out[name] = REGISTRY[name].count(methods[name], dims)
            dims = _resized(name, methods[name], dims)
    return out


def config_refusals(spaces: Mapping[str, MethodSpace], dims: ModelDims) -> dict[str, str]:
    """``{method: reason}`` for each method space with a value (a constant, a choice or a range's end, in any
    combination) that a model of ``dims`` cannot take (a LoRA rank above its block, dropout where it would be
    skipped, a ProDiaL block size that does not divide the input, SDT fractions that keep nothing): known before
    any trial, where ``apply_methods`` would raise in the middle of a search."""
    out: dict[str, str] = {}
    for name, space in spaces.items():
        check = getattr(REGISTRY.get(name), "check", None)
        if check is None or space.enabled is False:
            continue
        fields = [f for f in type(space).model_fields if f != "enabled"]
        for values in itertools.product(*(candidates(getattr(space, f)) for f in fields)):
            try:
                cfg = METHOD_SPACES[name][1](**dict(zip(fields, values, strict=True)))
            except ValueError:
                continue  # not a configuration the space can produce
            reason = check(cfg, dims)
            if reason is not None:
                out[name] = reason
                break
    return out


def apply_methods(lm: Any, methods: Mapping[str, MethodConfig], freeze: bool = True) -> AppliedMethods:
    """Freeze ``lm`` (unless ``freeze=False``) and add each method in registry order.

    The measured count of every method must equal its closed form; a mismatch is a bug and raises.
    """
    _check_names(methods)
    model_type = architecture(lm).model_type
    for name in methods:
        reason = supported(name, model_type)
        if reason is not None:
            raise MethodError(f"{name} is not supported on {model_type}: {reason}")
    if freeze:
        for p in lm.parameters():
            p.requires_grad_(False)
    applied = AppliedMethods(configs=dict(methods))
    dims = ModelDims.from_model(lm)
    for name in APPLY_ORDER:
        if name not in methods:
            continue
        params = REGISTRY[name].apply(lm, methods[name])
        for p in params:
            p.requires_grad_(True)
        applied.params[name] = params
        measured, formula = sum(p.numel() for p in params), REGISTRY[name].count(methods[name], dims)
        if measured != formula:
            raise MethodError(f"{name}: {measured} parameters added, closed form says {formula}")
        dims = _resized(name, methods[name], dims)
    return applied


def merge_methods(lm: nn.Module) -> None:
    """Fold every parametrisation into the tensor it adapts; ``lm`` becomes a plain HF model of its class.

    Raises (changing nothing) when a non-mergeable method is applied: save its adapter weights instead."""
    from trials.methods.prompt import ATTRIBUTE

    present = sorted({h for m in lm.modules() for h in (*HOOKS, ATTRIBUTE) if getattr(m, h, None) is not None})
    if present:
        raise MethodError(f"cannot merge: {', '.join(present)} is not a weight delta; save the adapter instead")
    # Every effective tensor is computed before any is folded: a tied weight (embeddings and lm_head) is one
    # stored tensor under two parametrisations, and folding one first would make the other add its delta twice.
    targets = [(module, name) for module in lm.modules() if parametrize.is_parametrized(module)
               for name in list(module.parametrizations.keys())]  # type: ignore[union-attr,operator]
    with torch.no_grad():
        values = [getattr(module, name).detach().clone() for module, name in targets]
    for (module, name), value in zip(targets, values, strict=True):
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        with torch.no_grad():
            getattr(module, name).set_(value)  # the same Parameter object, possibly a new shape (additional-scan)


def adapter_state(lm: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the methods added (the trainable ones after ``apply_methods``), by their module path."""
    return {name: p.detach().clone() for name, p in lm.named_parameters() if p.requires_grad}


def save_adapters(lm: nn.Module, methods: Mapping[str, MethodConfig], out: Path,
                  extra: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write ``adapter.safetensors`` (method tensors plus ``extra``, e.g. a task head) and ``adapter.json``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(lm)
    tensors.update({f"extra.{k}": v.detach().clone().contiguous() for k, v in (extra or {}).items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter.safetensors"))
    spec = {"methods": {n: c.model_dump() for n, c in methods.items()}}
    (out / "adapter.json").write_text(json.dumps(spec, indent=2) + "\n")


def load_adapters(lm: nn.Module, path: Path) -> tuple[AppliedMethods, dict[str, torch.Tensor]]:
    """Apply the saved spec to ``lm`` (a fresh copy of the same base model) and load the saved tensors.

    Returns the applied methods and the ``extra`` tensors (such as a task head)."""
    from safetensors.torch import load_file

    spec = json.loads((path / "adapter.json").read_text())
    methods = {name: method_config(name, values) for name, values in spec["methods"].items()}
    applied = apply_methods(lm, methods)
    tensors = load_file(str(path / "adapter.safetensors"))
    own = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    expected = set(adapter_state(lm))
    if set(own) != expected:
        raise MethodError(f"{path}: saved tensors {sorted(set(own) ^ expected)} do not match the spec")
    current = dict(lm.named_parameters())
    with torch.no_grad():
        for k, v in own.items():
            current[k].copy_(v)
    return applied, {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
