"""Sparse dimension tuning (SDT; Galim et al. 2025, "Parameter-Efficient Fine-Tuning of State Space Models",
arXiv 2410.09016, the SSM half of SDLoRA in furiosa-ai/ssm-peft).

1. A warm-up run trains a dense zero-init delta on ``A_log`` [E, N] only (the ``a_log_delta`` method) from the
   pretrained model, with the trial's data and training settings (``Sdt.prepare``, which the trial runner calls
   for every method that has it, handing in its own warm-up runner: this module never imports the runner).
2. Per layer, channel importance is sum_n delta[e, n]^2; the top c = E - round(freeze_channel * E) channels are
   kept and, for each, its top s = N - round(freeze_state * N) states by delta^2 (``select_dimensions``).
3. The trial restarts from the pretrained model and tunes zero-init deltas only on A_log[kept channel, its kept
   states] (c s values) and on x_proj's B rows (R..R+N-1) and C rows (R+N..R+2N-1) at the kept channel columns,
   all N states (N c each). The channel choice is per layer and shared by A, B and C.

Trainable per layer: c s + 2 N c (mamba-130m, freeze 0.99 / 0.75: 15 * 4 + 2 * 16 * 15 = 540). SDLoRA adds
LoRA r8 on out_proj (``lora_out_proj``). Each delta is a parametrisation P -> P + scatter(delta) at fixed index
buffers, so every path reading ``A_log`` / ``x_proj.weight`` sees the effective tensor, it stacks on other
parametrisations of the same tensor, and merging folds it in. Python's ``round`` (half to even) sets c and s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import DeltaConfig, SdtConfig, SdtLayer
from trials.methods.base import MethodError, WarmUp, mixers
from trials.models.interface import Architecture, ModelDims

if TYPE_CHECKING:
    from space.config import TrialConfig


class SparseDelta(nn.Module):
    """Parametrisation P -> P + delta scattered at P[rows, cols]; delta zero-initialised, of the index shape.

    The scatter is out of place (``index_put`` with ``accumulate``), so gradients reach both P's chain and
    delta; the indices are buffers so they follow the module to its device."""

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)  # [*shape] long
        self.register_buffer("cols", cols, persistent=False)  # [*shape] long
        self.delta = nn.Parameter(torch.zeros(rows.shape))  # [*shape]

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value.index_put((self.rows, self.cols), self.delta.to(value.dtype), accumulate=True)


def kept_sizes(cfg: SdtConfig, channels: int, states: int) -> tuple[int, int]:
    """(c, s): how many channels of ``channels`` (E) and states of ``states`` (N) the fractions keep."""
    c = channels - round(cfg.freeze_channel * channels)
    s = states - round(cfg.freeze_state * states)
    if c < 1 or s < 1:
        raise MethodError(f"sdt: freeze_channel {cfg.freeze_channel} / freeze_state {cfg.freeze_state} keep {c} of "
                          f"E={channels} channels and {s} of N={states} states; lower them to keep at least one")
    return c, s


def _top(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest entries, ties to the lower index, returned in ascending order."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def select_dimensions(a_log_deltas: list[torch.Tensor], cfg: SdtConfig) -> list[SdtLayer]:
    """The per-layer selection from the warm-up's A_log deltas (each [E, N])."""
    out = []
    for delta in a_log_deltas:
        sq = delta.detach().float().square()  # [E, N]
        c, s = kept_sizes(cfg, *sq.shape)
        channels = _top(sq.sum(dim=1), c)  # [E] importance
        out.append(SdtLayer(channels=tuple(channels), states=tuple(tuple(_top(sq[e], s)) for e in channels)))
    return out


def warmup_selection(cfg: TrialConfig, warm_up: WarmUp) -> SdtConfig:
    """Run SDT's warm-up for ``cfg`` (a trial with ``sdt`` among its methods) and return its sdt config with the
    selection filled in. The warm-up is a trial of its own: ``a_log_delta`` alone, same model, task, training
    settings and seed, for ``warmup_steps``; ``warm_up`` (the trial runner's) trains it and returns what it applied
    (the runner restores the global RNG state, so the trial that follows is the same as one given this selection
    outright)."""
    sdt = cfg.methods["sdt"]
    if not isinstance(sdt, SdtConfig):
        raise MethodError(f"sdt: expected an SdtConfig, got {type(sdt).__name__}")
    warm = cfg.model_copy(update={"methods": {"a_log_delta": DeltaConfig()}})
    applied = warm_up(warm, sdt.warmup_steps)
    deltas = [p.detach().cpu() for p in applied.params["a_log_delta"]]
    return sdt.model_copy(update={"selection": tuple(select_dimensions(deltas, sdt))})


def _checked(layer: SdtLayer, i: int, c: int, s: int, dims: ModelDims) -> None:
    where = f"sdt: selection layer {i}"
    if len(layer.channels) != c:
        raise MethodError(f"{where}: {len(layer.channels)} channels, the config keeps {c}")
    if len(set(layer.channels)) != c:
        raise MethodError(f"{where}: repeated channel in {list(layer.channels)}")
    if any(not 0 <= e < dims.E for e in layer.channels):
        raise MethodError(f"{where}: channel outside 0..{dims.E - 1} in {list(layer.channels)}")
    if len(layer.states) != c:
        raise MethodError(f"{where}: {len(layer.states)} state lists for {c} channels")
    for e, states in zip(layer.channels, layer.states, strict=True):
        if len(states) != s or len(set(states)) != s:
            raise MethodError(f"{where}: channel {e} has states {list(states)}, the config keeps {s} distinct ones")
        if any(not 0 <= n < dims.N for n in states):
            raise MethodError(f"{where}: channel {e} has a state outside 0..{dims.N - 1} in {list(states)}")


class Sdt:
    name = "sdt"
    mergeable = True

    def refusal(self, arch: Architecture) -> str | None:
        if arch.kind == "mamba1":
            return None
        return ("the selection is defined on Mamba-1's A_log [E, N] and x_proj's B/C rows; the Mamba-2 variant "
                "(heads of the per-head A, B/C blocks of in_proj) is not implemented yet")

    def prepare(self, cfg: TrialConfig, warm_up: WarmUp) -> SdtConfig:
        """The config with its selection: the given one, or the warm-up's."""
        sdt = cfg.methods["sdt"]
        if isinstance(sdt, SdtConfig) and sdt.selection is not None:
            return sdt
        return warmup_selection(cfg, warm_up)

    def check(self, cfg: SdtConfig, dims: ModelDims) -> str | None:
        try:
            kept_sizes(cfg, dims.E, dims.N)
        except MethodError as e:
            return str(e)
        return None

    def count(self, cfg: SdtConfig, dims: ModelDims) -> int:
        c, s = kept_sizes(cfg, dims.E, dims.N)
        return dims.L * (c * s + 2 * dims.N * c)

    def apply(self, lm: nn.Module, cfg: SdtConfig) -> list[nn.Parameter]:
        if cfg.selection is None:
            raise MethodError("sdt: no selection; build the trial with trials.run.build_trial (it runs the warm-up "
                              "through Sdt.prepare) or pass the config trials.methods.sdt.warmup_selection returns")
        layers = mixers(lm)
        dims = ModelDims.from_model(lm)
        c, s = kept_sizes(cfg, dims.E, dims.N)
        if len(cfg.selection) != len(layers):
            raise MethodError(f"sdt: selection has {len(cfg.selection)} layers, the model {len(layers)}")
        params = []
        for i, (mixer, layer) in enumerate(zip(layers, cfg.selection, strict=True)):
            _checked(layer, i, c, s, dims)
            channels = torch.tensor(layer.channels)  # [c]
            a_rows = channels[:, None].expand(c, s).clone()  # [c, s]
            a_cols = torch.tensor(layer.states)  # [c, s]
            # The C block starts after all of A_log's states, as the mixer splits x_proj's output (a method that
            # adds states may have enlarged both).
            owner, name = mixer.owner("A_log")
            x_proj = mixer.projection("x_proj")
            n_state = getattr(owner, name).shape[1]
            b_rows = mixer.spec.projection("x_proj").block("b").start + torch.arange(dims.N)  # [N]
            x_rows = torch.cat([b_rows, b_rows + n_state])[:, None].expand(2 * dims.N, c).clone()  # [2N, c]
            x_cols = channels[None, :].expand(2 * dims.N, c).clone()  # [2N, c]
            a_delta = SparseDelta(a_rows, a_cols).to(x_proj.weight.device)
            x_delta = SparseDelta(x_rows, x_cols).to(x_proj.weight.device)
            parametrize.register_parametrization(owner, name, a_delta)
            parametrize.register_parametrization(x_proj, "weight", x_delta)
            params += [a_delta.delta, x_delta.delta]
        return params


SDT = Sdt()
