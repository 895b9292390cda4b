"""Hybrid models: Mamba-2-style SSM layers (found by ``trials.models.mamba2``'s kind) beside attention layers and
MLPs, whose linear projections are targets too.

- Bamba (``BambaForCausalLM``): attention ``self_attn.{q,k,v,o}_proj`` at the configured layers, a dense MLP
  ``feed_forward.{gate,up,down}_proj`` in every layer.
- Granite 4.0 hybrids (``GraniteMoeHybridForCausalLM``): attention ``self_attn.{q,k,v,o}_proj``; a shared MLP
  ``shared_mlp.input_linear`` [2F, D] = gate | up (fused: rows [0, F) gate, [F, 2F) up) and ``output_linear``
  (down); with ``num_local_experts > 0`` also MoE experts stored as one fused tensor per layer
  (``block_sparse_moe.experts.gate_up_proj`` [n, 2F', D] = gate | up per expert, ``down_proj`` [n, D, F']),
  adapted per expert through ``parametrize`` (``moe_gate``, ``moe_up``, ``moe_down``).

A side target is found by the suffix of its module path, so it is the same search on every hybrid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trials.models.interface import Architecture, ModelDims, SideTarget, register_architecture
from trials.models.mamba2 import dims_of

# Module path suffixes of each side target. Granite's shared MLP computes act(gate) * up from the two halves of
# input_linear's output, so mlp_gate and mlp_up are blocks of that one fused weight there.
SIDE_SITES: dict[str, tuple[str, ...]] = {
    "attn_q": ("self_attn.q_proj",),
    "attn_k": ("self_attn.k_proj",),
    "attn_v": ("self_attn.v_proj",),
    "attn_o": ("self_attn.o_proj",),
    "mlp_gate": ("feed_forward.gate_proj", "shared_mlp.input_linear"),
    "mlp_up": ("feed_forward.up_proj", "shared_mlp.input_linear"),
    "mlp_down": ("feed_forward.down_proj", "shared_mlp.output_linear"),
}
FUSED_GATE_UP = "shared_mlp.input_linear"
# MoE experts stored as one fused parameter per layer (Granite's ``experts.gate_up_proj`` [n, 2F, D] = gate | up
# per expert, ``experts.down_proj`` [n, D, F]): (parameter name, which half of the rows, or None for all).
EXPERT_SITES: dict[str, tuple[str, int | None]] = {
    "moe_gate": ("gate_up_proj", 0),
    "moe_up": ("gate_up_proj", 1),
    "moe_down": ("down_proj", None),
}


def side_modules(lm: nn.Module, target: str) -> list[tuple[str, nn.Linear, tuple[int, int]]]:
    """Every (path, linear layer, adapted rows) of side target ``target`` in ``lm``."""
    out = []
    for path, module in lm.named_modules():
        if isinstance(module, nn.Linear) and path.endswith(SIDE_SITES[target]):
            if path.endswith(FUSED_GATE_UP):
                half = module.out_features // 2
                rows = (0, half) if target == "mlp_gate" else (half, module.out_features)
            else:
                rows = (0, module.out_features)
            out.append((path, module, rows))
    return out


def expert_tensors(lm: nn.Module, target: str) -> list[tuple[str, nn.Module, str, tuple[int, int]]]:
    """Every (module path, experts module, parameter name, adapted rows) of MoE target ``target`` in ``lm``."""
    attr, half = EXPERT_SITES[target]
    out = []
    for path, module in lm.named_modules():
        if path.endswith("experts") and isinstance(getattr(module, attr, None), torch.Tensor):
            rows = getattr(module, attr).shape[1]
            block = (0, rows) if half is None else (half * rows // 2, (half + 1) * rows // 2)
            out.append((path, module, attr, block))
    return out


def side_targets(lm: nn.Module) -> tuple[SideTarget, ...]:
    out = []
    for name in SIDE_SITES:
        found = side_modules(lm, name)
        if found:
            _, first, rows = found[0]
            out.append(SideTarget(name, first.in_features, first.out_features, len(found), rows))
    for name in EXPERT_SITES:
        experts = expert_tensors(lm, name)
        if experts:
            _, module, attr, rows = experts[0]
            n, out_f, in_f = getattr(module, attr).shape
            out.append(SideTarget(name, in_f, out_f, len(experts), rows, experts=n))
    return tuple(out)


def _hybrid_dims(model_type: str) -> Callable[[nn.Module], ModelDims]:
    return lambda lm: dims_of(lm, model_type, side_targets(lm))


def _no_config_dims(model_type: str) -> Callable[[Any], ModelDims]:
    def dims(config: Any) -> ModelDims:
        raise ValueError(f"{model_type}: sizes come from the model (ModelDims.from_model), not its config alone")
    return dims


BAMBA = register_architecture(Architecture(
    model_type="bamba", kind="mamba2", dims=_hybrid_dims("bamba"), dims_from_config=_no_config_dims("bamba"),
    attention=True, mlp=True, description="BambaForCausalLM (Mamba-2 + attention hybrid)"))
GRANITE = register_architecture(Architecture(
    model_type="granitemoehybrid", kind="mamba2", dims=_hybrid_dims("granitemoehybrid"),
    dims_from_config=_no_config_dims("granitemoehybrid"), attention=True, mlp=True, moe=True,
    description="GraniteMoeHybridForCausalLM (Granite 4.0 hybrid: Mamba-2 + attention, shared MLP, MoE)"))
