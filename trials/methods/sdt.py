"""Sparse dimension tuning (SDT; Galim et al. 2025, "Parameter-Efficient Fine-Tuning of State Space Models",
arXiv 2410.09016, the SSM half of SDLoRA in furiosa-ai/ssm-peft).

Mamba-1 (the authors' definition, ssm-peft's ``sd_lora.py``):

1. A warm-up run trains a dense zero-init delta on ``A_log`` [E, N] only (the ``a_log_delta`` method) from the
   pretrained model, with the trial's data and training settings (``Sdt.prepare``, which the trial runner calls
   for every method that has it, handing in its own warm-up runner: this module never imports the runner).
2. Per layer, channel importance is sum_n delta[e, n]^2; the top c = E - round(freeze_channel * E) channels are
   kept and, for each, its top s = N - round(freeze_state * N) states by delta^2 (``select_dimensions``).
3. The trial restarts from the pretrained model and tunes zero-init deltas only on A_log[kept channel, its kept
   states] (c s values) and on x_proj's B rows (R..R+N-1) and C rows (R+N..R+2N-1) at the kept channel columns,
   all N states (N c each). The channel choice is per layer and shared by A, B and C.

Trainable per layer: c s + 2 N c (mamba-130m, freeze 0.99 / 0.75: 15 * 4 + 2 * 16 * 15 = 540). SDLoRA adds
LoRA r8 on out_proj (``lora_out_proj``).

Mamba-2 (``Mamba2Mixer`` and the hybrids' Mamba-2 mixers; the project's own counterpart: ssm-peft's public code
defines SDT on Mamba-1's mixer only). A Mamba-2 head h is the unit a Mamba-1 channel was: it owns A (one scalar,
``A_log[h]``) and a slice of the state, [P, N]. A has no state axis to select in, and B and C are shared by every
head of a group, so the second selection level is the head's P channels (its rows of x), which belong to that
head alone: "SDT on heads and channels".

1. The warm-up trains dense zero-init deltas on ``A_log`` [H] and on ``conv1d.weight`` [I + 2GN, 1, K] (the
   ``a_log_delta`` and ``conv1d_delta`` methods): the conv delta of an x channel is that channel's own trained
   per-channel tensor, the one signal the warm-up has per channel.
2. Per layer, head importance is delta_A[h]^2; the top c = max(1, H - round(freeze_channel * H)) heads are kept
   (at least one: H is small, 24 on mamba2-130m, where 0.99 would keep none) and, for each, its top
   s = P - round(freeze_state * P) channels p by sum_k delta_conv[h P + p, 0, k]^2 (``select_heads``). In the
   config ``SdtLayer.channels`` holds the kept heads and ``SdtLayer.states`` each head's kept channels.
3. The trial tunes zero-init deltas only on A_log[kept heads] (c values) and on in_proj's x rows (x block start
   + h P + p) of the kept channels, all D columns (c s D): the weights that make those channels' inputs, as the
   Mamba-1 B/C deltas are the weights that read the kept channels.

Trainable per layer: c + c s D (mamba2-130m, H=24, P=64, D=768, freeze 0.99 / 0.75: 1 + 16 * 768 = 12,289).

Every delta is a parametrisation P -> P + scatter(delta) at fixed index buffers, so every path reading ``A_log``,
``x_proj.weight`` or ``in_proj.weight`` (transformers' forwards, the project's Mamba-2 mixer, merging) sees the
effective tensor, it stacks on other parametrisations of the same tensor, and merging folds it in. Python's
``round`` (half to even) sets c and s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import DeltaConfig, SdtConfig, SdtLayer
from trials.methods.base import MethodError, WarmUp, mixers
from trials.models.interface import Architecture, Mixer, ModelDims

if TYPE_CHECKING:
    from space.config import TrialConfig


class SparseDelta(nn.Module):
    """Parametrisation P -> P + delta scattered at P[rows, cols]; delta zero-initialised, of the index shape.

    The scatter is out of place (``index_put`` with ``accumulate``), so gradients reach both P's chain and
    delta; the indices are buffers so they follow the module to its device."""

    rows: torch.Tensor
    cols: torch.Tensor | None

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor | None = None) -> None:
        """``cols`` None: P is a vector (Mamba-2's A_log [H]) indexed by ``rows`` alone."""
        super().__init__()
        self.register_buffer("rows", rows, persistent=False)  # [*shape] long
        self.register_buffer("cols", cols, persistent=False)  # [*shape] long, or None
        self.delta = nn.Parameter(torch.zeros(rows.shape))  # [*shape]

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        index = (self.rows,) if self.cols is None else (self.rows, self.cols)
        return value.index_put(index, self.delta.to(value.dtype), accumulate=True)


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


def kept_heads(cfg: SdtConfig, heads: int, head_dim: int) -> tuple[int, int]:
    """Mamba-2's (c, s): how many of ``heads`` (H) heads the fraction keeps, at least one, and how many of each
    head's ``head_dim`` (P) channels."""
    c = max(1, heads - round(cfg.freeze_channel * heads))
    s = head_dim - round(cfg.freeze_state * head_dim)
    if s < 1:
        raise MethodError(f"sdt: freeze_state {cfg.freeze_state} keeps {s} of a head's P={head_dim} channels on "
                          "this Mamba-2; lower it to keep at least one")
    return c, s


def select_heads(a_log_deltas: list[torch.Tensor], conv_deltas: list[torch.Tensor], head_dim: int,
                 cfg: SdtConfig) -> list[SdtLayer]:
    """Mamba-2's per-layer selection from the warm-up's A_log deltas (each [H]) and conv1d deltas (each
    [I + 2GN, 1, K], x channels first): the top heads by delta_A^2 and, in each, its top channels by the squared
    conv delta summed over the kernel. ``SdtLayer.channels`` holds the heads, ``states`` each head's channels."""
    out = []
    for a_delta, conv_delta in zip(a_log_deltas, conv_deltas, strict=True):
        head_score = a_delta.detach().float().square()  # [H]
        heads = head_score.shape[0]
        c, s = kept_heads(cfg, heads, head_dim)
        channel_score = conv_delta.detach().float()[: heads * head_dim].square().sum(dim=(1, 2))  # [I]
        channel_score = channel_score.view(heads, head_dim)  # [H, P]
        kept = _top(head_score, c)
        out.append(SdtLayer(channels=tuple(kept), states=tuple(tuple(_top(channel_score[h], s)) for h in kept)))
    return out


def checkpoint_dims(checkpoint: str) -> ModelDims:
    """The sizes of ``checkpoint``'s model from its config alone (the model is built on the meta device, without
    weights): the warm-up's methods and the Mamba-2 selection depend on its mixer kind and head size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trials.models import mamba_ssm_format
    from trials.models.loading import architecture, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if mamba_ssm_format.is_mamba_ssm(path):
        config = mamba_ssm_format.to_transformers_config(json.loads((Path(path) / "config.json").read_text()))
    else:
        config = AutoConfig.from_pretrained(path)
    architecture(config, checkpoint)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return ModelDims.from_model(lm)


def warmup_selection(cfg: TrialConfig, warm_up: WarmUp) -> SdtConfig:
    """Run SDT's warm-up for ``cfg`` (a trial with ``sdt`` among its methods) and return its sdt config with the
    selection filled in. The warm-up is a trial of its own: ``a_log_delta`` alone (Mamba-2: with
    ``conv1d_delta``), same model, task, training settings and seed, for ``warmup_steps``; ``warm_up`` (the trial
    runner's) trains it and returns what it applied (the runner restores the global RNG state, so the trial that
    follows is the same as one given this selection outright)."""
    sdt = cfg.methods["sdt"]
    if not isinstance(sdt, SdtConfig):
        raise MethodError(f"sdt: expected an SdtConfig, got {type(sdt).__name__}")
    mixer = checkpoint_dims(cfg.model.checkpoint).mixer
    mamba2 = mixer.kind == "mamba2"
    methods = {"a_log_delta": DeltaConfig(), **({"conv1d_delta": DeltaConfig()} if mamba2 else {})}
    applied = warm_up(cfg.model_copy(update={"methods": methods}), sdt.warmup_steps)
    deltas = [p.detach().cpu() for p in applied.params["a_log_delta"]]
    if not mamba2:
        return sdt.model_copy(update={"selection": tuple(select_dimensions(deltas, sdt))})
    conv = [p.detach().cpu() for p in applied.params["conv1d_delta"]]
    return sdt.model_copy(update={"selection": tuple(select_heads(deltas, conv, mixer.head_dim, sdt))})


def _checked(layer: SdtLayer, i: int, c: int, s: int, units: int, members: int, unit: str = "channel",
             member: str = "state") -> None:
    """``layer`` keeps c distinct ``unit``s (Mamba-1: channels of E; Mamba-2: heads of H) and, for each, s distinct
    ``member``s (states of N; a head's channels of P), all in range."""
    where = f"sdt: selection layer {i}"
    kept = layer.channels
    if len(kept) != c:
        raise MethodError(f"{where}: {len(kept)} {unit}s, the config keeps {c}")
    if len(set(kept)) != c:
        raise MethodError(f"{where}: repeated {unit} in {list(kept)}")
    if any(not 0 <= e < units for e in kept):
        raise MethodError(f"{where}: {unit} outside 0..{units - 1} in {list(kept)}")
    if len(layer.states) != c:
        raise MethodError(f"{where}: {len(layer.states)} {member} lists for {c} {unit}s")
    for e, chosen in zip(kept, layer.states, strict=True):
        if len(chosen) != s or len(set(chosen)) != s:
            raise MethodError(f"{where}: {unit} {e} has {member}s {list(chosen)}, the config keeps {s} distinct ones")
        if any(not 0 <= n < members for n in chosen):
            raise MethodError(f"{where}: {unit} {e} has a {member} outside 0..{members - 1} in {list(chosen)}")


class Sdt:
    name = "sdt"
    mergeable = True

    def refusal(self, arch: Architecture) -> str | None:
        return None  # every kind: Mamba-1's channels and states, Mamba-2's heads and their channels

    def prepare(self, cfg: TrialConfig, warm_up: WarmUp) -> SdtConfig:
        """The config with its selection: the given one, or the warm-up's."""
        sdt = cfg.methods["sdt"]
        if isinstance(sdt, SdtConfig) and sdt.selection is not None:
            return sdt
        return warmup_selection(cfg, warm_up)

    def _sizes(self, cfg: SdtConfig, dims: ModelDims) -> tuple[int, int]:
        if dims.mixer.kind == "mamba2":
            return kept_heads(cfg, dims.mixer.heads, dims.mixer.head_dim)
        return kept_sizes(cfg, dims.E, dims.N)

    def check(self, cfg: SdtConfig, dims: ModelDims) -> str | None:
        try:
            self._sizes(cfg, dims)
        except MethodError as e:
            return str(e)
        return None

    def count(self, cfg: SdtConfig, dims: ModelDims) -> int:
        c, s = self._sizes(cfg, dims)
        if dims.mixer.kind == "mamba2":
            return dims.L * (c + c * s * dims.D)
        return dims.L * (c * s + 2 * dims.N * c)

    def apply(self, lm: nn.Module, cfg: SdtConfig) -> list[nn.Parameter]:
        if cfg.selection is None:
            raise MethodError("sdt: no selection; build the trial with trials.run.build_trial (it runs the warm-up "
                              "through Sdt.prepare) or pass the config trials.methods.sdt.warmup_selection returns")
        layers = mixers(lm)
        dims = ModelDims.from_model(lm)
        c, s = self._sizes(cfg, dims)
        if len(cfg.selection) != len(layers):
            raise MethodError(f"sdt: selection has {len(cfg.selection)} layers, the model {len(layers)}")
        params = []
        for i, (mixer, layer) in enumerate(zip(layers, cfg.selection, strict=True)):
            if dims.mixer.kind == "mamba2":
                _checked(layer, i, c, s, dims.mixer.heads, dims.mixer.head_dim, unit="head", member="channel")
                params += _apply_heads(mixer, layer, c, s)
            else:
                _checked(layer, i, c, s, dims.E, dims.N)
                params += _apply_channels(mixer, layer, c, s, dims)
        return params


def _apply_channels(mixer: Mixer, layer: SdtLayer, c: int, s: int, dims: ModelDims) -> list[nn.Parameter]:
    """Mamba-1: deltas on A_log[kept channel, its kept states] and on x_proj's B and C rows at the kept channels."""
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
    return [a_delta.delta, x_delta.delta]


def _apply_heads(mixer: Mixer, layer: SdtLayer, c: int, s: int) -> list[nn.Parameter]:
    """Mamba-2: deltas on A_log[kept heads] and on in_proj's x rows of each kept head's kept channels, all D
    columns."""
    heads = torch.tensor(layer.channels)  # [c]
    owner, name = mixer.owner("A_log")
    in_proj = mixer.projection("in_proj")
    p, d = mixer.spec.head_dim, in_proj.in_features
    # The x block sits after z [I]; a method that adds states (additional-scan) grows only B, C and dt after it.
    x_start = mixer.spec.projection("in_proj").block("x").start
    rows = (x_start + heads[:, None] * p + torch.tensor(layer.states)).reshape(c * s)  # [c s]
    x_rows = rows[:, None].expand(c * s, d).clone()  # [c s, D]
    x_cols = torch.arange(d)[None, :].expand(c * s, d).clone()  # [c s, D]
    a_delta = SparseDelta(heads).to(in_proj.weight.device)  # [c]
    x_delta = SparseDelta(x_rows, x_cols).to(in_proj.weight.device)  # [c s, D]
    parametrize.register_parametrization(owner, name, a_delta)
    parametrize.register_parametrization(in_proj, "weight", x_delta)
    return [a_delta.delta, x_delta.delta]


SDT = Sdt()
