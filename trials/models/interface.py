"""One typed interface for every SSM mixer kind: what the PEFT methods may know about a mixer.

A kind (Mamba-1, Mamba-2, ...) is one module of ``trials.models`` that registers a ``MixerKind``: it recognises its
mixers, and describes them as a ``MixerSpec`` (sizes only, so closed-form counts need no model) plus the hooks
their forward honours. Methods are written against ``Mixer`` (a spec bound to one mixer module) and ``ModelDims``
(the whole model's sizes) only; they never reach into a mixer by attribute name (the one exception: additional-scan
records the grown state in ``ssm_state_size``, which every transformers SSM mixer keeps). An architecture (a
``model_type``) is registered with its kind and what it has besides (attention, MLP, MoE), so whether a method
applies is known from the model type alone (``trials.methods.supported``).

Notation (as peft-methods.md): D hidden, E (Mamba-2: I) inner width, N state size, K conv kernel, H heads,
P head dim, G groups, R dt rank (Mamba-1), L SSM layers, V vocabulary.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from torch import nn

Hook = Literal["initial_state", "conv_state", "affix_tokens", "state_offset", "parallel_adapter"]
HOOKS: tuple[Hook, ...] = ("initial_state", "conv_state", "affix_tokens", "state_offset", "parallel_adapter")


class ArchitectureError(ValueError):
    """A model or module this package does not support; the message names what was found and what is."""


class CheckpointError(ValueError):
    """A checkpoint the project cannot fine-tune as it is: another architecture, or weights that do not fit."""


@dataclass(frozen=True)
class Block:
    """Output rows [start, stop) of a projection that one part of the mixer reads (Mamba-2's ``B`` block)."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Projection:
    """A linear layer of the mixer: its attribute name, sizes and how its output splits into named blocks.

    ``hookable``: the layer is called as a module on every execution path (a forward hook on it, such as LoRA
    dropout's, always runs); False where a fused kernel is handed its weight instead."""

    name: str
    in_features: int
    out_features: int
    blocks: tuple[Block, ...] = ()
    hookable: bool = True

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"{self.name} has no block {name!r}; its blocks: {[b.name for b in self.blocks]}")


@dataclass(frozen=True)
class TensorSpec:
    """A per-channel or per-head tensor of the mixer: its role (``A_log``, ``D``, ``dt_bias``, ``norm``,
    ``conv_weight``, ``conv_bias``), its path inside the mixer and its shape."""

    role: str
    path: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class MixerSpec:
    """The sizes of one SSM mixer kind, from the model config alone.

    ``tensors``: the per-channel or per-head tensors by role; a role the kind lacks is absent. ``state_shape``
    is one example's recurrent state ([E, N] or [H, P, N])."""

    kind: str
    hidden: int  # D
    inner: int  # E / I
    state: int  # N
    conv_kernel: int  # K
    conv_channels: int  # channels conv1d runs over: E (Mamba-1) or I + 2GN (Mamba-2)
    heads: int  # H (Mamba-1: one per channel, E)
    head_dim: int  # P (Mamba-1: 1)
    groups: int  # G (Mamba-1: 1)
    dt_rank: int  # R (Mamba-2: 0, dt comes from in_proj per head)
    projections: tuple[Projection, ...]
    tensors: tuple[TensorSpec, ...]
    state_shape: tuple[int, ...]
    conv_bias: bool = True  # conv1d has a bias (BitFit creates one where it lacks it)

    def projection(self, name: str) -> Projection:
        for p in self.projections:
            if p.name == name:
                return p
        raise KeyError(f"a {self.kind} mixer has no projection {name!r}; its projections: "
                       f"{[p.name for p in self.projections]}")

    def has_projection(self, name: str) -> bool:
        return any(p.name == name for p in self.projections)

    def tensor(self, role: str) -> TensorSpec:
        for t in self.tensors:
            if t.role == role:
                return t
        raise KeyError(f"a {self.kind} mixer has no {role!r} tensor; its tensors: {[t.role for t in self.tensors]}")

    def has_tensor(self, role: str) -> bool:
        return any(t.role == role for t in self.tensors)


@dataclass(frozen=True)
class SideTarget:
    """A linear layer outside the SSM mixers that methods may adapt (a hybrid's attention, MLP or MoE expert
    projection): ``count`` layers have it, each [out_features, in_features] (``experts`` of them per layer where
    the experts are stored as one fused [experts, out, in] tensor)."""

    name: str  # the method-facing name: attn_q, mlp_up, moe_down, ...
    in_features: int
    out_features: int
    count: int
    rows: tuple[int, int] | None = None  # a block of a fused weight's output rows (Granite's gate | up)
    experts: int = 1


@dataclass(frozen=True)
class ModelDims:
    """The sizes a closed-form parameter count needs, for any supported architecture."""

    model_type: str
    mixer: MixerSpec  # every SSM layer of a model is of one kind
    L: int  # SSM layers
    V: int  # vocabulary
    norms: int  # RMSNorm weights of size D outside the mixers (per-layer norms and the final one)
    side: tuple[SideTarget, ...] = ()

    @property
    def D(self) -> int:  # noqa: N802 (the notation of the papers)
        return self.mixer.hidden

    @property
    def E(self) -> int:  # noqa: N802
        return self.mixer.inner

    @property
    def N(self) -> int:  # noqa: N802
        return self.mixer.state

    @property
    def R(self) -> int:  # noqa: N802
        return self.mixer.dt_rank

    @property
    def K(self) -> int:  # noqa: N802
        return self.mixer.conv_kernel

    def side_target(self, name: str) -> SideTarget | None:
        return next((t for t in self.side if t.name == name), None)

    @classmethod
    def from_model(cls, lm: nn.Module) -> ModelDims:
        """The sizes of ``lm`` (read before any method enlarges a tensor)."""
        return architecture(lm).dims(lm)

    @classmethod
    def from_config(cls, config: object) -> ModelDims:
        """The sizes from a config alone, for the architectures whose layers all follow their config."""
        return architecture_of(str(getattr(config, "model_type", ""))).dims_from_config(config)


@dataclass
class Mixer:
    """One SSM mixer of a model: its spec, module, dotted path and the hooks its forward honours."""

    spec: MixerSpec
    module: nn.Module
    path: str
    hooks: frozenset[Hook] = field(default_factory=frozenset)
    runtime: str = ""  # which forward runs it ("transformers' Mamba2Mixer"), for refusals

    def projection(self, name: str) -> nn.Linear:
        self.spec.projection(name)  # a clear error for a projection the kind lacks
        module = self.module.get_submodule(name)
        assert isinstance(module, nn.Linear)
        return module

    def owner(self, role: str) -> tuple[nn.Module, str]:
        """The module holding the tensor of ``role`` and its attribute name (``conv_weight`` -> (conv1d, "weight"))."""
        owner, _, name = self.spec.tensor(role).path.rpartition(".")
        return (self.module.get_submodule(owner) if owner else self.module), name

    def honours(self, hook: Hook) -> bool:
        return hook in self.hooks

    def set_hook(self, hook: Hook, value: object) -> None:
        if hook not in self.hooks:
            raise ArchitectureError(f"{self.path}: {self.runtime or type(self.module).__name__} does not honour "
                                    f"{hook}; it honours {sorted(self.hooks) or 'no hooks'}")
        setattr(self.module, hook, value)

    def hook(self, hook: Hook) -> object:
        return getattr(self.module, hook, None)


class MixerKind(Protocol):
    """A mixer kind: recognises its modules and binds them to the interface."""

    name: str
    layout: MixerSpec  # the kind's projections, blocks and tensors (at placeholder sizes): what exists, by name

    def matches(self, module: nn.Module) -> bool: ...

    def bind(self, module: nn.Module, path: str) -> Mixer: ...


Family = Literal["mamba1", "mamba2", "hybrid"]


@dataclass(frozen=True)
class Architecture:
    """A supported model type (the config's ``model_type``): how it loads, where its SSM mixers are, their kind, and
    what else it has for methods to adapt. The one table of architectures: each kind module registers its own.

    ``mixers`` is where the SSM mixers live, ``{i}`` standing for the layer index; in a hybrid only some layers have
    one, and ``mixer_class`` tells them from attention layers that share the path (NemotronH's ``mixer``).
    ``logits_multiplier`` / ``logits_divisor`` name the config scale the causal LM applies after ``lm_head``.
    """

    model_type: str
    kind: str  # the mixer kind of its SSM layers
    dims: Callable[[nn.Module], ModelDims]
    dims_from_config: Callable[[object], ModelDims]
    model_class: str  # the transformers class it loads as (through AutoModelForCausalLM)
    family: Family  # mamba1, mamba2, or a hybrid of Mamba-2 mixers with attention and MLP layers
    mixers: str
    mixer_class: str
    attention: bool = False  # attention layers (q/k/v/o projections)
    mlp: bool = False  # dense MLP projections (gate/up/down)
    moe: bool = False  # MoE experts stored as one fused tensor
    # Mixer tensor roles or side targets its kind has but this architecture does not ("state_growth": the state
    # size cannot grow, for additional-scan).
    lacks: tuple[str, ...] = ()
    project_mixer: bool = True  # the project's mixer for its kind can run it (the hooks need it)
    # The config attribute of a multiplier the model applies to the embeddings of input_ids but not to inputs_embeds
    # it is given (Falcon-H1's muP scaling): code that embeds tokens itself must apply it.
    ids_embedding_multiplier: str | None = None
    logits_multiplier: str | None = None
    logits_divisor: str | None = None
    description: str = ""

    def input_scale(self, config: object) -> float:
        return float(getattr(config, self.ids_embedding_multiplier)) if self.ids_embedding_multiplier else 1.0

    def output_scale(self, config: object) -> float:
        scale = float(getattr(config, self.logits_multiplier)) if self.logits_multiplier else 1.0
        return scale / float(getattr(config, self.logits_divisor)) if self.logits_divisor else scale


KINDS: dict[str, MixerKind] = {}
ARCHITECTURES: dict[str, Architecture] = {}


def register_kind(kind: MixerKind) -> MixerKind:
    KINDS[kind.name] = kind
    return kind


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.model_type] = arch
    return arch


KIND_MODULES = ("mamba1", "mamba2", "hybrid")


def _load_kinds() -> None:
    """Import every kind module once (each registers itself): a new architecture is one new file listed here."""
    for name in KIND_MODULES:  # in the order the support table lists them
        importlib.import_module(f"trials.models.{name}")


def architectures() -> dict[str, Architecture]:
    """Every supported architecture by ``model_type``, in the order the support table lists them."""
    _load_kinds()
    return ARCHITECTURES


def architecture_of(model_type: str) -> Architecture:
    _load_kinds()
    if model_type not in ARCHITECTURES:
        raise ArchitectureError(f"model_type {model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def architecture(lm: nn.Module) -> Architecture:
    return architecture_of(str(getattr(getattr(lm, "config", None), "model_type", "")))


def iter_mixers(lm: nn.Module) -> Iterator[Mixer]:
    _load_kinds()
    for path, module in lm.named_modules():
        for kind in KINDS.values():
            if kind.matches(module):
                yield kind.bind(module, path)
                break


def mixer_kinds(lm: nn.Module) -> list[Mixer]:
    """Every SSM mixer of ``lm`` bound to its kind, in layer order; an error when there is none."""
    found = list(iter_mixers(lm))
    if not found:
        raise ArchitectureError(f"{type(lm).__name__} has no SSM mixer of a supported kind ({', '.join(KINDS)})")
    return found


def model_norms(lm: nn.Module) -> list[str]:
    """The paths of every RMSNorm weight outside the SSM mixers (per-layer norms and the final one); a mixer's
    gated norm is the mixer kind's own tensor (``norm.weight``), not one of these."""
    return [f"{path}.weight" for path, module in lm.named_modules()
            if type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)]


__all__ = ["ARCHITECTURES", "HOOKS", "Architecture", "ArchitectureError", "Block", "CheckpointError", "Hook", "Mixer",
           "MixerKind", "MixerSpec", "ModelDims", "Projection", "SideTarget", "TensorSpec", "architecture",
           "architecture_of", "architectures", "iter_mixers", "mixer_kinds", "model_norms", "register_architecture",
           "register_kind"]
