"""The shape every PEFT method module shares, and the helpers they use.

A method is written against the mixer interface of ``trials.models.interface`` only: the SSM layers of any
supported model are ``Mixer`` objects (a kind's spec bound to one module), and the sizes a closed-form count needs
are a ``ModelDims``. A method says, per architecture, whether it applies (``refusal``), so an unsupported
combination is refused when the space is validated, before any training.

A weight delta is applied through ``torch.nn.utils.parametrize``: the adapted tensor (``in_proj.weight``,
``A_log``, ...) becomes ``original + delta`` wherever it is read, so no execution path (the torch reference scan,
mambapy, or code that passes ``.weight`` straight to a kernel) can bypass it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from torch import nn
from torch.nn.utils import parametrize

from trials.models.interface import KINDS, Architecture, Mixer, MixerSpec, ModelDims, mixer_kinds


class Method(Protocol):
    """One PEFT method: its name, closed-form count, where it applies and how it changes a model."""

    name: str
    mergeable: bool

    def count(self, cfg: Any, dims: ModelDims) -> int: ...

    def refusal(self, arch: Architecture) -> str | None:
        """None when the method applies to models of ``arch``, else the reason it does not."""
        ...

    def apply(self, lm: Any, cfg: Any) -> list[nn.Parameter]:
        """Add the method's tensors to ``lm`` and return them (trainable)."""
        ...


# Given a trial config and a warm-up runner (train a config for some steps, return its applied methods), return
# the method's config resolved for the trial.
WarmUp = Callable[[Any, int], Any]


@runtime_checkable
class Prepared(Protocol):
    """A method that needs a pass over the trial's data before training (SDT's warm-up): ``prepare`` returns its
    config resolved for the trial (``cfg``: the whole trial config; ``warm_up(trial_cfg, steps)`` trains another
    configuration of the same trial and returns what it applied)."""

    def prepare(self, cfg: Any, warm_up: WarmUp) -> Any: ...


class MethodError(ValueError):
    """A method cannot be applied to this model; the message names the method and module."""


def layout(arch: Architecture) -> MixerSpec:
    """What the SSM mixers of ``arch`` have, by name (its kind's layout, less what the architecture lacks)."""
    from trials.models.interface import architecture_of

    architecture_of(arch.model_type)  # loads the kinds
    spec = KINDS[arch.kind].layout
    return replace(spec, tensors=tuple(t for t in spec.tensors if t.role not in arch.lacks))


class OnRows:
    """A method on a projection of every SSM mixer: all its output rows, or one named block of them (Mamba-2's
    ``in_proj`` = z | x | B | C | dt). ``instead`` says what to use where a kind lacks the target."""

    def __init__(self, name: str, projection: str, block: str | None = None, instead: str = "") -> None:
        self.name, self.projection, self.block, self.instead = name, projection, block, instead

    def _rows(self, spec: MixerSpec) -> tuple[int, int]:
        proj = spec.projection(self.projection)
        if self.block is None:
            return 0, proj.out_features
        b = proj.block(self.block)
        return b.start, b.stop

    def refusal(self, arch: Architecture) -> str | None:
        spec = layout(arch)
        what = self.projection if self.block is None else f"{self.projection} block {self.block}"
        if spec.has_projection(self.projection) and (
                self.block is None or any(b.name == self.block for b in spec.projection(self.projection).blocks)):
            return None
        return f"a {spec.kind} mixer has no {what}{self.instead}"


def stored(module: nn.Module, name: str) -> Any:
    """The tensor stored under any parametrisations of ``module.<name>`` (a tied weight is one stored tensor read
    by two modules; additional-scan's enlarged A_log keeps the pretrained [E, N] one)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original  # type: ignore[union-attr,index]
    return getattr(module, name)


def mixers(lm: nn.Module) -> list[Mixer]:
    """Every SSM mixer of ``lm`` behind the interface, in layer order."""
    try:
        return mixer_kinds(lm)
    except ValueError as e:
        raise MethodError(str(e)) from e
