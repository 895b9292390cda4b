"""Methods that add to the selective scan's inputs or state rather than to a weight.

- Affix tuning (MambaPEFT's re-design of prefix tuning, Yoshimura et al. 2025): n learned positions per layer
  prepended to the x half of ``in_proj``'s output before conv1d; the scan runs over them and their outputs
  are dropped. MambaPEFT learns 2E values per position, but the z half of a dropped position only gates that
  position's (dropped) output, so it can never receive a gradient; here only the x half [n, E] is learned
  (half MambaPEFT's count). N(0, 1) init, as MambaPEFT's ``nn.Embedding``. With ``projection``, one shared
  encoder makes every layer's tokens: Embedding(n, E) -> Linear(E, E) -> Tanh -> Linear(E, L E). Per layer
  n E (without projection); model-level n E + E^2 + E + L E^2 + L E (with). Not mergeable.
- Initial-state tuning (ssm-peft's ``SelectiveScanWithInitState``): a learned h0 [E, N] per layer the scan
  starts from, and with ``conv_state`` the K-1 inputs conv1d starts from [K-1, E]. Zero init (identity).
  Per layer E N (+ (K-1) E). Not mergeable.
- State-offset tuning (Galim et al. 2025, arXiv 2503.03499): y_t += silu(z_t) * (H C_t), H [E, N] zero-init,
  i.e. the output reads the state shifted by a learned offset. Per layer E N. Not mergeable.
- Additional-scan (MambaPEFT): n extra state dimensions per layer. Mamba-1: A_log grows to [E, N + n] with the new
  columns copied from the last existing one (``scan_A_copy_from_last``), x_proj grows new B and C rows
  (nn.Linear default init). The model's ``state_size`` becomes N + n, so transformers' cache, mambapy and the
  project's mixer all size their state from it. Per layer 3 E n. Mergeable into a model with d_state N + n.
  Mamba-2 (A is per head, so it does not grow): each group gets n more B and C rows in in_proj and n more B and C
  channels in conv1d (weight and bias), after its N pretrained ones, the layout of a Mamba-2 with state N + n
  (nn.Linear's and nn.Conv1d's default init). Per layer 2 G n (D + K (+ 1 with a conv bias)). The methods applied
  after it (affix tokens, initial and conv states, state offset) are sized for N + n.

On Mamba-2 (the project's Mamba-2 mixer, ``trials.models.mamba2_mixer``) the same hooks take the kind's shapes
(``MixerSpec``): affix tokens enter x | B | C before the convolution ([n, I + 2GN], so E above reads I + 2GN),
the initial state and the state offset are [H, P, N], the conv state [K-1, I + 2GN].

The first three are implemented by the project's mixer (``trials.models.mamba1_mixer``); on transformers' own paths
(``model.scan: mambapy`` or ``hf_loop``) they are refused when applied.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import AdditionalScanConfig, AffixConfig, InitialStateConfig, ZeroDecayConfig
from trials.methods.base import Method, MethodError, mixers
from trials.models.interface import Architecture, Hook, Mixer, ModelDims


def project_mixers(lm: nn.Module, method: str, hook: Hook) -> list[Mixer]:
    """The mixers, when every one honours ``hook`` (the project's mixer does; transformers' paths do not)."""
    found = mixers(lm)
    for m in found:
        if not m.honours(hook):
            raise MethodError(f"{method} needs the project's mixer, but {m.path} runs {m.runtime}: use model.scan "
                              "auto, compiled or torch (trials.models.loading.use_scan), not mambapy or hf_loop")
    return found


def project_hook(arch: Architecture, hook: str) -> str | None:
    """Mamba-1's project mixer honours every hook; on Mamba-2 only the project's Mamba-2 mixer does (transformers'
    forward honours none), so the method is refused where that mixer is not part of this installation. Which
    mixer a model actually runs is checked when the method is applied (``project_mixers``)."""
    if arch.kind == "mamba1":
        return None
    if not arch.project_mixer:
        return f"the {hook} hook needs the project's Mamba-2 mixer, which does not run {arch.model_type}'s mixer"
    if importlib.util.find_spec("trials.models.mamba2_mixer") is None:
        return f"the {hook} hook needs the project's Mamba-2 mixer (trials.models.mamba2_mixer), which is not installed"
    return None


class AffixEncoder(nn.Module):
    """The shared projection that makes every layer's affix tokens: [n] -> [L, n, E]."""

    def __init__(self, tokens: int, width: int, layers: int) -> None:
        super().__init__()
        self.layers, self.width = layers, width
        self.embedding = nn.Parameter(torch.randn(tokens, width))  # [n, E]
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, layers * width))

    def forward(self) -> torch.Tensor:
        out = self.mlp(self.embedding)  # [n, L E]
        return out.reshape(-1, self.layers, self.width).transpose(0, 1)  # [L, n, E]


class _LayerTokens:
    """A mixer's affix tokens read from the shared encoder (a plain callable, so the encoder is registered
    once, on the backbone, not under every mixer)."""

    def __init__(self, encoder: AffixEncoder, layer: int) -> None:
        self.encoder, self.layer = encoder, layer

    def __call__(self) -> torch.Tensor:
        return self.encoder()[self.layer]  # [n, E]


class AffixTuning:
    name = "affix_tuning"
    mergeable = False
    identity_at_init = False
    needs_project_mixer = True

    def refusal(self, arch: Architecture) -> str | None:
        return project_hook(arch, "affix_tokens")

    def count(self, cfg: AffixConfig, dims: ModelDims) -> int:
        n, e, L = cfg.tokens, dims.mixer.conv_channels, dims.L
        if cfg.projection:
            return n * e + (e * e + e) + (e * L * e + L * e)
        return L * n * e

    def apply(self, lm: nn.Module, cfg: AffixConfig) -> list[nn.Parameter]:
        found = project_mixers(lm, self.name, "affix_tokens")
        width = found[0].spec.conv_channels  # what the convolution reads: x (Mamba-1), x | B | C (Mamba-2)
        device = found[0].projection("in_proj").weight.device
        if cfg.projection:
            encoder = AffixEncoder(cfg.tokens, width, len(found)).to(device)
            base: Any = lm.base_model
            base.affix_encoder = encoder
            for i, mixer in enumerate(found):
                mixer.set_hook("affix_tokens", _LayerTokens(encoder, i))
            return list(encoder.parameters())
        params = []
        for mixer in found:
            tokens = nn.Parameter(torch.randn(cfg.tokens, width, device=device))  # [n, E]
            mixer.set_hook("affix_tokens", tokens)
            params.append(tokens)
        return params


def zero_state(mixer: Mixer) -> nn.Parameter:
    """A zero [E, N] tensor on the mixer's device, N the pretrained state size (the mixer zero-pads it when
    additional-scan has enlarged the state)."""
    device = mixer.projection("in_proj").weight.device
    return nn.Parameter(torch.zeros(mixer.spec.state_shape, device=device))  # [E, N]


class InitialState:
    name = "initial_state"
    mergeable = False
    needs_project_mixer = True

    def refusal(self, arch: Architecture) -> str | None:
        return project_hook(arch, "initial_state")

    def count(self, cfg: InitialStateConfig, dims: ModelDims) -> int:
        m = dims.mixer
        return dims.L * (math.prod(m.state_shape) + (m.conv_channels * (m.conv_kernel - 1) if cfg.conv_state else 0))

    def apply(self, lm: nn.Module, cfg: InitialStateConfig) -> list[nn.Parameter]:
        params = []
        for mixer in project_mixers(lm, self.name, "initial_state"):
            h0 = zero_state(mixer)  # [E, N]
            mixer.set_hook("initial_state", h0)
            params.append(h0)
            if cfg.conv_state:
                c, k = mixer.spec.conv_channels, mixer.spec.conv_kernel
                conv = nn.Parameter(torch.zeros(k - 1, c, device=h0.device))  # [K-1, E]
                mixer.set_hook("conv_state", conv)
                params.append(conv)
        return params


class StateOffset:
    name = "state_offset"
    mergeable = False
    needs_project_mixer = True

    def refusal(self, arch: Architecture) -> str | None:
        return project_hook(arch, "state_offset")

    def count(self, cfg: ZeroDecayConfig, dims: ModelDims) -> int:
        return dims.L * math.prod(dims.mixer.state_shape)

    def apply(self, lm: nn.Module, cfg: ZeroDecayConfig) -> list[nn.Parameter]:
        params = []
        for mixer in project_mixers(lm, self.name, "state_offset"):
            offset = zero_state(mixer)  # [E, N]
            mixer.set_hook("state_offset", offset)
            params.append(offset)
        return params


class ExtraALog(nn.Module):
    """A_log [E, N] -> [E, N + n]: the new columns are learned."""

    def __init__(self, a_log: torch.Tensor, states: int) -> None:
        super().__init__()
        self.extra = nn.Parameter(a_log.detach()[:, -1:].float().repeat(1, states))  # [E, n]

    def forward(self, a_log: torch.Tensor) -> torch.Tensor:
        return torch.cat([a_log, self.extra.to(a_log.dtype)], dim=1)  # [E, N + n]


class ExtraBCRows(nn.Module):
    """x_proj.weight [R + 2N, E] -> [R + 2(N + n), E]: new B rows after the B block, new C rows after C."""

    def __init__(self, rank: int, states: int, extra: int, in_features: int) -> None:
        super().__init__()
        self.rank, self.states = rank, states
        self.b_rows = nn.Parameter(torch.empty(extra, in_features))  # [n, E]
        self.c_rows = nn.Parameter(torch.empty(extra, in_features))  # [n, E]
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default init
        nn.init.uniform_(self.b_rows, -bound, bound)
        nn.init.uniform_(self.c_rows, -bound, bound)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        dt, b, c = torch.split(weight, [self.rank, self.states, self.states])
        return torch.cat([dt, b, self.b_rows.to(weight.dtype), c, self.c_rows.to(weight.dtype)])


class ExtraGroupRows(nn.Module):
    """Mamba-2's extra state dimensions in a tensor laid out x | B | C along dim 0 (behind ``lead`` rows: in_proj's
    z; after them in_proj's dt): each group's n new B rows follow its N pretrained ones (B [G, N] -> [G, N + n],
    group-major, the layout of a Mamba-2 with state N + n), likewise C. Used on in_proj.weight [*, D], conv1d.weight
    [*, 1, K] and conv1d.bias [*]; the new rows are learned."""

    def __init__(self, lead: int, groups: int, states: int, extra: int, row: tuple[int, ...], bound: float) -> None:
        super().__init__()
        self.lead, self.groups, self.states = lead, groups, states
        self.b_rows = nn.Parameter(torch.empty(groups, extra, *row).uniform_(-bound, bound))  # [G, n, *row]
        self.c_rows = nn.Parameter(torch.empty(groups, extra, *row).uniform_(-bound, bound))  # [G, n, *row]

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        g, gn = self.groups, self.groups * self.states
        head, b, c, tail = torch.split(value, [self.lead, gn, gn, value.shape[0] - self.lead - 2 * gn])
        b = torch.cat([b.reshape(g, self.states, *b.shape[1:]), self.b_rows.to(value.dtype)], dim=1)  # [G, N + n, .]
        c = torch.cat([c.reshape(g, self.states, *c.shape[1:]), self.c_rows.to(value.dtype)], dim=1)  # [G, N + n, .]
        return torch.cat([head, b.flatten(0, 1), c.flatten(0, 1), tail])


STATE_KEYS = ("state_size", "mamba_d_state", "ssm_state_size")  # the config's state size, by architecture


class AdditionalScan:
    name = "additional_scan"
    mergeable = True
    identity_at_init = False

    def refusal(self, arch: Architecture) -> str | None:
        if "state_growth" in arch.lacks:
            return (f"{arch.model_type} scales in_proj's output by a fixed per-row multiplier vector sized for the "
                    "pretrained state, so the state cannot grow")
        return None

    def count(self, cfg: AdditionalScanConfig, dims: ModelDims) -> int:
        m = dims.mixer
        if m.kind == "mamba1":
            return dims.L * 3 * dims.E * cfg.states
        # per group: n B rows and n C rows of in_proj [D] and of conv1d [K] (+ its bias)
        return dims.L * 2 * m.groups * cfg.states * (m.hidden + m.conv_kernel + (1 if m.conv_bias else 0))

    def resize(self, cfg: AdditionalScanConfig, dims: ModelDims) -> ModelDims:
        """On Mamba-2 the methods applied after this one see the state N + n (their hooks are sized by x | B | C);
        on Mamba-1 they keep the pretrained N (the project's mixer zero-pads their states)."""
        m = dims.mixer
        if m.kind == "mamba1":
            return dims
        from trials.models.mamba2 import spec

        return replace(dims, mixer=spec(m.hidden, m.inner, m.state + cfg.states, m.conv_kernel, m.heads, m.head_dim,
                                        m.groups, norm=m.has_tensor("norm"), conv_bias=m.conv_bias))

    def apply(self, lm: Any, cfg: AdditionalScanConfig) -> list[nn.Parameter]:
        found = mixers(lm)
        params = [p for mixer in found for p in (self._mamba1(mixer, cfg) if mixer.spec.kind == "mamba1"
                                                  else self._mamba2(mixer, cfg))]
        for key in STATE_KEYS:  # transformers' cache and a merged checkpoint follow it
            if hasattr(lm.config, key):
                setattr(lm.config, key, found[0].spec.state + cfg.states)
                break
        for mixer in found:
            module: Any = mixer.module
            module.ssm_state_size = mixer.spec.state + cfg.states
            if hasattr(module, "conv_dim"):
                module.conv_dim = mixer.spec.conv_channels + 2 * mixer.spec.groups * cfg.states
        return params

    def _mamba1(self, mixer: Mixer, cfg: AdditionalScanConfig) -> list[nn.Parameter]:
        spec, n = mixer.spec, mixer.spec.state
        owner, name = mixer.owner("A_log")
        current = getattr(owner, name)
        if current.shape[1] != n:
            raise MethodError(f"{self.name}: {mixer.path}.A_log has {current.shape[1]} states, its pretrained "
                              f"A_log {n}: apply additional_scan once")
        x_proj = mixer.projection("x_proj")
        a = ExtraALog(current, cfg.states).to(current.device)
        rows = ExtraBCRows(spec.dt_rank, n, cfg.states, spec.inner).to(x_proj.weight.device)
        parametrize.register_parametrization(owner, name, a, unsafe=True)
        parametrize.register_parametrization(x_proj, "weight", rows, unsafe=True)
        return [a.extra, rows.b_rows, rows.c_rows]

    def _mamba2(self, mixer: Mixer, cfg: AdditionalScanConfig) -> list[nn.Parameter]:
        """n more B and C rows per group in in_proj (nn.Linear's default init) and in conv1d (nn.Conv1d's)."""
        spec, n = mixer.spec, cfg.states
        in_proj = mixer.projection("in_proj")
        if in_proj.bias is not None:
            raise MethodError(f"{self.name}: {mixer.path}.in_proj has a bias, which additional_scan does not extend")
        conv, _ = mixer.owner("conv_weight")
        lead, k = spec.projection("in_proj").block("b").start, spec.conv_kernel
        device = in_proj.weight.device
        rows = ExtraGroupRows(lead, spec.groups, spec.state, n, (spec.hidden,), 1 / math.sqrt(spec.hidden))
        taps = ExtraGroupRows(spec.inner, spec.groups, spec.state, n, (1, k), 1 / math.sqrt(k))
        added = [(in_proj, "weight", rows.to(device)), (conv, "weight", taps.to(device))]
        if spec.conv_bias:
            added.append((conv, "bias", ExtraGroupRows(spec.inner, spec.groups, spec.state, n, (), 1 / math.sqrt(k))
                          .to(device)))
        for module, tensor, extra in added:
            parametrize.register_parametrization(module, tensor, extra, unsafe=True)
        return [p for _, _, extra in added for p in (extra.b_rows, extra.c_rows)]


AFFIX_METHODS = [AffixTuning()]
STATE_METHODS: list[Method] = [InitialState(), StateOffset()]
ADDITIONAL_SCAN_METHODS = [AdditionalScan()]
