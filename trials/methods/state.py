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
- Additional-scan (MambaPEFT): n extra state dimensions per layer: A_log grows to [E, N + n] with the new
  columns copied from the last existing one (``scan_A_copy_from_last``), x_proj grows new B and C rows
  (nn.Linear default init). The model's ``state_size`` becomes N + n, so transformers' cache, mambapy and the
  project's mixer all size their state from it. Per layer 3 E n. Mergeable into a model with d_state N + n.

The first three are implemented by the project's mixer (``trials.mixer``); on transformers' own paths
(``model.scan: mambapy`` or ``hf_loop``) they are refused when applied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from space.methods import AdditionalScanConfig, AffixConfig, InitialStateConfig, ZeroDecayConfig
from trials.methods.base import Method, MethodError, ModelDims, mixers, stored


def project_mixers(lm: nn.Module, method: str) -> list[Any]:
    from trials.mixer import FastMambaMixer

    found = mixers(lm)
    for i, m in enumerate(found):
        if not isinstance(m, FastMambaMixer):
            raise MethodError(f"{method} needs the project's mixer, but backbone.layers.{i}.mixer is "
                              f"transformers' {type(m).__name__}: use model.scan auto, compiled or torch "
                              "(trials.model.use_scan), not mambapy or hf_loop")
    return found


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

    def count(self, cfg: AffixConfig, dims: ModelDims) -> int:
        n, e, L = cfg.tokens, dims.E, dims.L
        if cfg.projection:
            return n * e + (e * e + e) + (e * L * e + L * e)
        return L * n * e

    def apply(self, lm: nn.Module, cfg: AffixConfig) -> list[nn.Parameter]:
        found = project_mixers(lm, self.name)
        width = found[0].intermediate_size
        device = found[0].A_log.device
        if cfg.projection:
            encoder = AffixEncoder(cfg.tokens, width, len(found)).to(device)
            lm.get_submodule("backbone").affix_encoder = encoder
            for i, mixer in enumerate(found):
                mixer.affix_tokens = _LayerTokens(encoder, i)
            return list(encoder.parameters())
        params = []
        for mixer in found:
            mixer.affix_tokens = nn.Parameter(torch.randn(cfg.tokens, width, device=device))  # [n, E]
            params.append(mixer.affix_tokens)
        return params


def zero_state(mixer: Any) -> nn.Parameter:
    """A zero [E, N] tensor on the mixer's device, N the pretrained state size (the mixer zero-pads it when
    additional-scan has enlarged the state)."""
    shape = (mixer.intermediate_size, stored(mixer, "A_log").shape[1])
    return nn.Parameter(torch.zeros(shape, device=mixer.A_log.device))  # [E, N]


class InitialState:
    name = "initial_state"
    mergeable = False
    needs_project_mixer = True

    def count(self, cfg: InitialStateConfig, dims: ModelDims) -> int:
        return dims.L * (dims.E * dims.N + (dims.E * (dims.K - 1) if cfg.conv_state else 0))

    def apply(self, lm: nn.Module, cfg: InitialStateConfig) -> list[nn.Parameter]:
        params = []
        for mixer in project_mixers(lm, self.name):
            mixer.initial_state = zero_state(mixer)  # [E, N]
            params.append(mixer.initial_state)
            if cfg.conv_state:
                e, k = mixer.intermediate_size, mixer.conv_kernel_size
                mixer.conv_state = nn.Parameter(torch.zeros(k - 1, e, device=mixer.A_log.device))  # [K-1, E]
                params.append(mixer.conv_state)
        return params


class StateOffset:
    name = "state_offset"
    mergeable = False
    needs_project_mixer = True

    def count(self, cfg: ZeroDecayConfig, dims: ModelDims) -> int:
        return dims.L * dims.E * dims.N

    def apply(self, lm: nn.Module, cfg: ZeroDecayConfig) -> list[nn.Parameter]:
        params = []
        for mixer in project_mixers(lm, self.name):
            mixer.state_offset = zero_state(mixer)  # [E, N]
            params.append(mixer.state_offset)
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


class AdditionalScan:
    name = "additional_scan"
    mergeable = True
    identity_at_init = False

    def count(self, cfg: AdditionalScanConfig, dims: ModelDims) -> int:
        return dims.L * 3 * dims.E * cfg.states

    def apply(self, lm: Any, cfg: AdditionalScanConfig) -> list[nn.Parameter]:
        dims = ModelDims.from_config(lm.config)
        params: list[nn.Parameter] = []
        for i, mixer in enumerate(mixers(lm)):
            if mixer.A_log.shape[1] != dims.N:
                raise MethodError(f"{self.name}: backbone.layers.{i}.mixer.A_log has {mixer.A_log.shape[1]} states, "
                                  f"the config says {dims.N}")
            a = ExtraALog(mixer.A_log, cfg.states).to(mixer.A_log.device)
            rows = ExtraBCRows(dims.R, dims.N, cfg.states, dims.E).to(mixer.x_proj.weight.device)
            parametrize.register_parametrization(mixer, "A_log", a, unsafe=True)
            parametrize.register_parametrization(mixer.x_proj, "weight", rows, unsafe=True)
            mixer.ssm_state_size = dims.N + cfg.states
            params += [a.extra, rows.b_rows, rows.c_rows]
        lm.config.state_size = dims.N + cfg.states  # transformers' cache and a merged checkpoint follow it
        return params


AFFIX_METHODS = [AffixTuning()]
STATE_METHODS: list[Method] = [InitialState(), StateOffset()]
ADDITIONAL_SCAN_METHODS = [AdditionalScan()]
