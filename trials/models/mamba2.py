"""The Mamba-2 mixer kind: transformers' ``Mamba2Mixer`` and the hybrids' Mamba-2-style mixers (Bamba's
``BambaMixer``, Granite 4.0's ``GraniteMoeHybridMambaLayer``, ``FalconH1Mixer``, ``NemotronHMamba2Mixer``), which
share its attributes and forward (Falcon-H1 scales in_proj's output per block by fixed multipliers, which scale a
block's LoRA delta alike, and may lack the gated norm).

in_proj [2I + 2GN + H, D] splits into z [I] | x [I] | B [GN] | C [GN] | dt [H]; depthwise conv1d [I + 2GN, 1, K]
over x | B | C; per head A_log, D, dt_bias [H]; the gated RMSNorm's weight [I]; out_proj [D, I]. State per example
[H, P, N]. There is no x_proj or dt_proj: B, C and dt are blocks of in_proj, dt per head.

Every path (the chunked torch scan, the cached step, mamba-ssm's fused CUDA kernel) reads conv1d's, the norm's
and out_proj's weights and the per-head tensors as attributes, and calls in_proj as a module, so a parametrised
tensor is the tensor used everywhere. The fused kernel is handed out_proj's weight, so a forward hook of out_proj
(LoRA dropout there, a parallel adapter) would be skipped on CUDA: out_proj is not ``hookable`` under transformers'
forward, which honours none of the state hooks either; the project's Mamba-2 mixer (``trials.models.mamba2_mixer``)
honours them all and calls out_proj as a module.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from trials.models.interface import (
    HOOKS,
    Architecture,
    Block,
    Hook,
    Mixer,
    MixerSpec,
    ModelDims,
    Projection,
    TensorSpec,
    mixer_kinds,
    model_norms,
    register_architecture,
    register_kind,
)


def spec(D: int, I: int, N: int, K: int, H: int, P: int, G: int,  # noqa: E741,N803 (notation)
         norm: bool = True, conv_bias: bool = True) -> MixerSpec:
    gn, conv = G * N, I + 2 * G * N
    blocks = (Block("z", 0, I), Block("x", I, 2 * I), Block("b", 2 * I, 2 * I + gn),
              Block("c", 2 * I + gn, 2 * I + 2 * gn), Block("dt", 2 * I + 2 * gn, 2 * I + 2 * gn + H))
    # The conv bias is listed even where a model was built without one: BitFit creates it.
    # Falcon-H1 may be built without the gated norm (``mamba_rms_norm: false``).
    tensors = (TensorSpec("A_log", "A_log", (H,)), TensorSpec("D", "D", (H,)), TensorSpec("dt_bias", "dt_bias", (H,)),
               *((TensorSpec("norm", "norm.weight", (I,)),) if norm else ()),
               TensorSpec("conv_weight", "conv1d.weight", (conv, 1, K)),
               TensorSpec("conv_bias", "conv1d.bias", (conv,)))
    return MixerSpec(
        kind="mamba2", hidden=D, inner=I, state=N, conv_kernel=K, conv_channels=conv, heads=H, head_dim=P, groups=G,
        dt_rank=0,
        projections=(Projection("in_proj", D, 2 * I + 2 * gn + H, blocks),
                     Projection("out_proj", I, D, hookable=False)),
        tensors=tensors, state_shape=(H, P, N), conv_bias=conv_bias)


def _classes() -> tuple[type, ...]:
    from transformers.models.bamba.modeling_bamba import BambaMixer
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    return Mamba2Mixer, BambaMixer, GraniteMoeHybridMambaLayer, FalconH1Mixer, NemotronHMamba2Mixer


def _project_hooks(module: nn.Module) -> frozenset[Hook] | None:
    """The hooks the project's Mamba-2 mixer declares it honours (its module's ``HOOKS``), when it runs ``module``."""
    try:
        from trials.models import mamba2_mixer
    except ImportError:
        return None
    if not isinstance(module, mamba2_mixer.FastSSDForward):
        return None
    return frozenset(h for h in HOOKS if h in mamba2_mixer.HOOKS)


class Mamba2Kind:
    name = "mamba2"
    layout = spec(1, 1, 1, 2, 1, 1, 1)

    def __init__(self) -> None:
        self._types: tuple[type, ...] | None = None

    def matches(self, module: nn.Module) -> bool:
        if self._types is None:
            self._types = _classes()
        return isinstance(module, self._types)

    def bind(self, module: nn.Module, path: str) -> Mixer:
        m: Any = module
        s = spec(m.hidden_size, m.intermediate_size, m.ssm_state_size, m.conv_kernel_size, m.num_heads, m.head_dim,
                 m.n_groups, norm=getattr(getattr(m, "norm", None), "weight", None) is not None,
                 conv_bias=m.conv1d.bias is not None)
        project = _project_hooks(module)
        if project is not None:
            # The project's forward calls out_proj as a module and leaves the fused kernel when it has a forward
            # hook, so out_proj's hooks (LoRA dropout) run there.
            s = replace(s, projections=tuple(replace(p, hookable=True) for p in s.projections))
            return Mixer(spec=s, module=module, path=path, hooks=project, runtime="the project's FastMamba2Mixer")
        return Mixer(spec=s, module=module, path=path, hooks=frozenset(),
                     runtime=f"transformers' {type(module).__name__}")


KIND = register_kind(Mamba2Kind())


def dims_of(lm: nn.Module, model_type: str, side: tuple = ()) -> ModelDims:
    found = mixer_kinds(lm)
    config: Any = lm.config
    return ModelDims(model_type=model_type, mixer=found[0].spec, L=len(found), V=config.vocab_size,
                     norms=len(model_norms(lm)), side=side)


def _dims_from_config(config: Any) -> ModelDims:
    c = config
    mixer = spec(c.hidden_size, int(c.expand * c.hidden_size), c.state_size, c.conv_kernel, c.num_heads, c.head_dim,
                 c.n_groups, conv_bias=c.use_conv_bias)
    return ModelDims(model_type="mamba2", mixer=mixer, L=c.num_hidden_layers, V=c.vocab_size,
                     norms=c.num_hidden_layers + 1)


ARCHITECTURE = register_architecture(Architecture(
    model_type="mamba2", kind="mamba2", dims=lambda lm: dims_of(lm, "mamba2"), dims_from_config=_dims_from_config,
    model_class="Mamba2ForCausalLM", family="mamba2", mixers="backbone.layers.{i}.mixer", mixer_class="Mamba2Mixer",
    description="Mamba2ForCausalLM (Mamba-2)"))
