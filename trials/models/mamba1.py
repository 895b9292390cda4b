"""The Mamba-1 mixer kind (transformers' ``MambaMixer`` and the project's ``FastMambaMixer``).

in_proj [2E, D] splits into x | z; x_proj [R + 2N, E] into dt | B | C; dt_proj [E, R]; per channel A_log [E, N],
D [E], dt_proj.bias [E]; depthwise conv1d [E, 1, K] over x. State per example [E, N]. The project's mixer honours
every hook; transformers' own paths (mambapy, hf_loop) honour only the parallel adapter, which runs as a forward
hook of out_proj.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn
from torch.nn.utils import parametrize
from transformers.models.mamba.modeling_mamba import MambaMixer

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


def spec(D: int, E: int, N: int, R: int, K: int, conv_bias: bool = True) -> MixerSpec:  # noqa: N803 (notation)
    return MixerSpec(
        kind="mamba1", hidden=D, inner=E, state=N, conv_kernel=K, conv_channels=E, heads=E, head_dim=1, groups=1,
        dt_rank=R,
        projections=(
            Projection("in_proj", D, 2 * E, (Block("x", 0, E), Block("z", E, 2 * E))),
            Projection("x_proj", E, R + 2 * N, (Block("dt", 0, R), Block("b", R, R + N), Block("c", R + N, R + 2 * N))),
            # transformers reads dt_proj.weight directly (never calls the module), so no forward hook runs on it.
            Projection("dt_proj", R, E, hookable=False),
            Projection("out_proj", E, D),
        ),
        tensors=(TensorSpec("A_log", "A_log", (E, N)), TensorSpec("D", "D", (E,)),
                 TensorSpec("dt_bias", "dt_proj.bias", (E,)), TensorSpec("conv_weight", "conv1d.weight", (E, 1, K)),
                 TensorSpec("conv_bias", "conv1d.bias", (E,))),
        state_shape=(E, N), conv_bias=conv_bias,
    )


def dims(D: int, E: int, N: int, R: int, K: int, L: int, V: int) -> ModelDims:  # noqa: N803
    """Mamba-1 sizes by hand (the papers' per-layer counts use them)."""
    return ModelDims(model_type="mamba", mixer=spec(D, E, N, R, K), L=L, V=V, norms=L + 1)


class Mamba1Kind:
    name = "mamba1"
    layout = spec(2, 2, 1, 1, 2)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, MambaMixer)

    def bind(self, module: nn.Module, path: str) -> Mixer:
        from trials.models.mamba1_mixer import FastMambaMixer

        # The state size of the pretrained A_log: additional-scan enlarges the effective one, not the stored one.
        m: Any = module
        a_log = m.parametrizations["A_log"].original if parametrize.is_parametrized(module, "A_log") else m.A_log
        s = spec(m.hidden_size, m.intermediate_size, a_log.shape[1], m.time_step_rank, m.conv_kernel_size,
                 conv_bias=m.conv1d.bias is not None)
        fast = isinstance(module, FastMambaMixer)
        hooks: frozenset[Hook] = frozenset(HOOKS) if fast else frozenset({"parallel_adapter"})
        runtime = "the project's FastMambaMixer" if fast else "transformers' MambaMixer"
        return Mixer(spec=s, module=module, path=path, hooks=hooks, runtime=runtime)


KIND = register_kind(Mamba1Kind())


def _dims(lm: nn.Module) -> ModelDims:
    found = mixer_kinds(lm)
    config: Any = lm.config
    return ModelDims(model_type="mamba", mixer=found[0].spec, L=len(found), V=config.vocab_size,
                     norms=len(model_norms(lm)))


def _dims_from_config(config: Any) -> ModelDims:
    c = config
    d = dims(c.hidden_size, c.intermediate_size, c.state_size, c.time_step_rank, c.conv_kernel, c.num_hidden_layers,
             c.vocab_size)
    return replace(d, mixer=replace(d.mixer, conv_bias=c.use_conv_bias))


ARCHITECTURE = register_architecture(Architecture(
    model_type="mamba", kind="mamba1", dims=_dims, dims_from_config=_dims_from_config,
    model_class="MambaForCausalLM", family="mamba1", mixers="backbone.layers.{i}.mixer", mixer_class="MambaMixer",
    description="MambaForCausalLM (Mamba-1)"))
