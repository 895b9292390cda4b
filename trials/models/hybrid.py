"""Hybrid models: Mamba-2-style SSM layers (found by ``trials.models.mamba2``'s kind) beside attention layers and
MLPs, whose linear projections are targets too.

- Bamba (``BambaForCausalLM``): attention ``self_attn.{q,k,v,o}_proj`` at the configured layers, a dense MLP
  ``feed_forward.{gate,up,down}_proj`` in every layer.
- Falcon-H1 (``FalconH1ForCausalLM``): attention ``self_attn.*`` beside the mixer in every layer, MLP
  ``feed_forward.*``; its mixer's gated norm is optional (off in the released models), so gated_norm_delta is refused,
  and it scales in_proj's output by a fixed multiplier vector (``mup_vector``), so the state cannot grow.
- NemotronH (``NemotronHForCausalLM``): every layer's block is ``mixer``: Mamba-2, attention (``mixer.q_proj``, ...)
  or an MLP without a gate (``mixer.up_proj``, ``mixer.down_proj``), by the config's layer pattern.
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
# NemotronH names every layer's block ``mixer`` (Mamba-2, attention or a gate-less MLP).
SIDE_SITES: dict[str, tuple[str, ...]] = {
    "attn_q": ("self_attn.q_proj", "mixer.q_proj"),
    "attn_k": ("self_attn.k_proj", "mixer.k_proj"),
    "attn_v": ("self_attn.v_proj", "mixer.v_proj"),
    "attn_o": ("self_attn.o_proj", "mixer.o_proj"),
    "mlp_gate": ("feed_forward.gate_proj", "shared_mlp.input_linear"),
    "mlp_up": ("feed_forward.up_proj", "shared_mlp.input_linear", "mixer.up_proj"),
    "mlp_down": ("feed_forward.down_proj", "shared_mlp.output_linear", "mixer.down_proj"),
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


def _hybrid(model_type: str, model_class: str, mixers: str, mixer_class: str, description: str,
            **flags: Any) -> Architecture:
    return register_architecture(Architecture(
        model_type=model_type, kind="mamba2", dims=_hybrid_dims(model_type),
        dims_from_config=_no_config_dims(model_type), model_class=model_class, family="hybrid", mixers=mixers,
        mixer_class=mixer_class, attention=True, mlp=True, description=description, **flags))


# Each was checked on CPU with a tiny random config (transformers 5.24): it builds, runs forward and backward, and
# save_pretrained/from_pretrained gives back the same logits. Zamba2 (mixers at two depths, shared attention blocks
# with adapters of their own) and Jamba (Mamba-1 mixers inside a MoE hybrid) also pass those checks but are left out
# until the method library maps them.
BAMBA = _hybrid("bamba", "BambaForCausalLM", "model.layers.{i}.mamba", "BambaMixer",
                "BambaForCausalLM (Mamba-2 + attention hybrid)")
GRANITE = _hybrid("granitemoehybrid", "GraniteMoeHybridForCausalLM", "model.layers.{i}.mamba",
                  "GraniteMoeHybridMambaLayer", "GraniteMoeHybridForCausalLM (Granite 4.0 hybrid: Mamba-2 + attention, "
                  "shared MLP, MoE)", moe=True, logits_divisor="logits_scaling")
FALCON_H1 = _hybrid("falcon_h1", "FalconH1ForCausalLM", "model.layers.{i}.mamba", "FalconH1Mixer",
                    "FalconH1ForCausalLM (attention beside the Mamba-2 mixer in every layer)",
                    lacks=("norm", "state_growth"), project_mixer=False,
                    ids_embedding_multiplier="embedding_multiplier", logits_multiplier="lm_head_multiplier")
NEMOTRON_H = _hybrid("nemotron_h", "NemotronHForCausalLM", "model.layers.{i}.mixer", "NemotronHMamba2Mixer",
                     "NemotronHForCausalLM (Mamba-2, attention and gate-less MLP layers by pattern)",
                     lacks=("mlp_gate",))
