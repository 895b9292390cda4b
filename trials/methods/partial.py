"""Partial tuning as zero-init additive deltas (MambaPEFT's A-, D-, Conv1d- and Bias-tuning "v2",
Yoshimura et al. 2025): P' = P + delta on the mixer's ``A_log`` (Mamba-1 [E, N], Mamba-2 [H]), ``D`` ([E] / [H]),
``conv1d.weight`` ([E, 1, K] / [I + 2GN, 1, K]) or dt's bias (Mamba-1 ``dt_proj.bias`` [E], Mamba-2 ``dt_bias``
[H]); on Mamba-2's gated RMSNorm weight [I] (``gated_norm_delta``); on every RMSNorm weight outside the mixers
(per-layer norms and the final one, [D] each, ssm-peft's LayerFreeze set); and BitFit (ssm-peft's ``conv_dt``: the
conv1d bias and dt's bias).

delta is zero at init and the original P stays frozen; the method's weight decay (amplified by
``weight_decay_mult``: 10 for A/D/conv1d, 100 for the biases in the reference recipe) acts on delta, pulling P
back toward its pretrained value rather than toward zero. Trainable per layer: the tensor's size (Mamba-1: EN, E,
EK, E; Mamba-2: H, H, (I + 2GN) K, H, I); D per norm; conv channels + dt's bias for BitFit. Mergeable:
P <- P + delta. A model built without a conv1d bias gets a zero one for BitFit (and its config says
``use_conv_bias: true``, hybrids ``mamba_conv_bias``, so the merged checkpoint loads with it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import DeltaConfig
from trials.methods.base import MethodError, layout, mixers
from trials.models.interface import Architecture, Mixer, ModelDims, model_norms


class AdditiveDelta(nn.Module):
    """Parametrisation P -> P + delta with delta zero-initialised, of P's shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value + self.delta.to(value.dtype)


def _add_conv_bias(lm: Any, mixer: Mixer) -> None:
    """Give the mixer's conv1d a frozen zero bias if it was built without one (BitFit creates it), and say so in
    the config, so a merged checkpoint loads with it."""
    conv: Any = mixer.owner("conv_bias")[0]
    if getattr(conv, "bias", None) is None:
        weight = conv.weight
        conv.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                 requires_grad=False)
        module: Any = mixer.module
        module.use_conv_bias = True
        for key in ("use_conv_bias", "mamba_conv_bias"):  # Mamba-1/2 and the hybrids name it differently
            if hasattr(lm.config, key):
                setattr(lm.config, key, True)


def _delta(owner: nn.Module, tensor: str, where: str, name: str) -> nn.Parameter:
    current = getattr(owner, tensor, None)
    if current is None:
        raise MethodError(f"{name}: {where} does not exist (a model built without it)")
    delta = AdditiveDelta(current.shape).to(current.device)
    parametrize.register_parametrization(owner, tensor, delta)
    return delta.delta


class MixerDelta:
    """A zero-init additive delta on each SSM mixer's tensors of the given roles (``A_log``, ``dt_bias``, ...)."""

    mergeable = True

    def __init__(self, name: str, roles: tuple[str, ...], note: str = "") -> None:
        self.name, self.roles, self.note = name, roles, note

    def refusal(self, arch: Architecture) -> str | None:
        spec = layout(arch)
        missing = [r for r in self.roles if not spec.has_tensor(r)]
        if not missing:
            return None
        if any(r in arch.lacks for r in missing):  # the kind has it, this architecture's models do not
            return f"{arch.model_type}'s mixers are built without the {', '.join(missing)} tensor"
        return f"a {spec.kind} mixer has no {', '.join(missing)} tensor{self.note}"

    def count(self, cfg: DeltaConfig, dims: ModelDims) -> int:
        return dims.L * sum(dims.mixer.tensor(r).numel for r in self.roles)

    def apply(self, lm: nn.Module, cfg: DeltaConfig) -> list[nn.Parameter]:
        params = []
        for mixer in mixers(lm):
            for role in self.roles:
                if role == "conv_bias":
                    _add_conv_bias(lm, mixer)
                owner, tensor = mixer.owner(role)
                params.append(_delta(owner, tensor, f"{mixer.path}.{mixer.spec.tensor(role).path}", self.name))
        return params


class NormDelta:
    """A zero-init additive delta on every RMSNorm weight outside the mixers (per-layer norms and the final one)."""

    name = "norm_delta"
    mergeable = True

    def refusal(self, arch: Architecture) -> str | None:
        return None

    def count(self, cfg: DeltaConfig, dims: ModelDims) -> int:
        return dims.norms * dims.D

    def apply(self, lm: nn.Module, cfg: DeltaConfig) -> list[nn.Parameter]:
        params = []
        for path in model_norms(lm):
            owner_path, _, tensor = path.rpartition(".")
            params.append(_delta(lm.get_submodule(owner_path), tensor, path, self.name))
        return params


PARTIAL_METHODS: list[MixerDelta | NormDelta] = [
    MixerDelta("a_log_delta", ("A_log",)),
    MixerDelta("d_delta", ("D",)),
    MixerDelta("conv1d_delta", ("conv_weight",)),
    MixerDelta("dt_bias_delta", ("dt_bias",)),  # dt_proj.bias on Mamba-1, the per-head dt_bias on Mamba-2
    NormDelta(),
    MixerDelta("gated_norm_delta", ("norm",), note=" (Mamba-1's output is gated by silu(z) without a norm)"),
    MixerDelta("bitfit", ("conv_bias", "dt_bias")),
]
