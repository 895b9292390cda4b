"""The project's Mamba-2 mixer forward: transformers' ``Mamba2Mixer`` (and the hybrids' mixers of the same
structure) with the chunked SSD scan of ``trials.models.ssd`` and the hooks PEFT methods need.

Notation as in ``trials.models.ssd``: Bt batch, L length, D hidden, I inner width (= H P), H heads, P head dim,
G groups, N state size, K conv kernel, conv_dim = I + 2 G N (the x | B | C channels the convolution sees).

``install_fast_mamba2_mixer(lm, scan)`` switches every mixer of a Mamba-2 model, and of the hybrids listed in
``FAST_CLASSES`` (Bamba, GraniteMoeHybrid, NemotronH), to its fast subclass (weights, state dict and
``save_pretrained`` are unchanged). Without a generation cache its forward:
- reads every weight through its module attribute (``self.in_proj`` and ``self.out_proj`` are called as modules,
  ``self.conv1d.weight``, ``self.A_log``, ``self.D``, ``self.dt_bias``, ``self.norm``), so a parametrised weight
  (W + delta) is the weight used and forward hooks on in_proj / out_proj (LoRA dropout) run;
- splits in_proj's output as z [I] | xBC [conv_dim] | dt [H] and xBC as x [I] | B [G N'] | C [G N'], with the
  state size N' = (conv_dim - I) / (2 G) read from ``conv1d.weight`` ([conv_dim, 1, K]). Extra state dimensions
  (additional-scan) are therefore the layout of a Mamba-2 with a larger state: each group's n new B columns
  follow its N pretrained ones (B = [G, N + n], group-major), likewise C, with matching in_proj rows and conv1d
  channels inserted at those places;
- starts the scan from ``mixer.initial_state`` [H, P, N''] (N'' <= N', zero-padded);
- starts the convolution from ``mixer.conv_state`` [K-1, conv_dim], the xBC inputs it has "already seen";
- prepends ``mixer.affix_tokens`` [n, conv_dim] (or a callable returning it) to xBC before the convolution, with
  a raw dt of 0 at those positions (dt = softplus(dt_bias)), and drops those positions after the scan (their z
  could only gate outputs that are dropped);
- adds the state offset ``mixer.state_offset`` O [H, P, N''] (N'' <= N') read out by C, y_t += O C_t, before the
  gated norm (so it is gated by silu(z) like the scan output: the state is read as S_t + O);
- leaves the fused kernel when ``mixer.parallel_adapter`` is set: the method hooks out_proj, which the fused
  kernel applies inside;
- zeroes padded positions (``attention_mask``) before in_proj and after the convolution, as transformers does.
With a generation cache it defers to transformers' cached path, which knows none of the state hooks: with one
set, the first call runs the project's scan (so an eval forward works) and a decoding step raises rather than
generate from a different model. On CUDA with ``model.scan: auto`` it calls mamba-ssm's
``mamba_split_conv1d_scan_combined`` with the effective weights (and the initial state); it runs the torch path when
the kernel cannot run here, when ``model.scan`` is ``torch``, or when a hook (or a forward hook on out_proj) or the
conv channel count needs what the kernel does not take, and ``trials.models.fused`` says why (once, at WARNING).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bamba.modeling_bamba import BambaMixer
from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from trials.models import fused as fused_kernels
from trials.models.scan import Impl, causal_conv
from trials.models.ssd import discretize_dt, reference_scan, ssd_scan

HOOKS = ("initial_state", "conv_state", "affix_tokens", "state_offset", "parallel_adapter")  # set by methods
STATE_HOOKS = HOOKS[:4]  # what transformers' cached generation path would silently skip
FUSED_HOOKS = ("initial_state",)  # what the fused kernel takes itself
# mamba-ssm's causal-conv1d asserts a channel count that is a multiple of this (additional-scan's grown state can
# break it: conv_dim = I + 2 G (N + n)).
CONV_CHANNEL_MULTIPLE = 8


def _fused_kernel() -> Any:
    """mamba-ssm's ``mamba_split_conv1d_scan_combined``, or None where it cannot run here
    (``trials.models.fused.mamba2_kernel`` says why)."""
    return fused_kernels.mamba2_kernel()[0]


class FastSSDForward(nn.Module):
    """The forward shared by the fast mixers; mixed in before a transformers mixer class that has in_proj,
    conv1d, A_log, D, dt_bias, norm, out_proj, intermediate_size, num_heads, head_dim, n_groups, chunk_size,
    time_step_limit, activation and layer_idx."""

    scan_impl: Impl = "auto"
    # The hooks (see the module docstring) are plain attributes set by methods and read with ``_hook``: no class
    # default, which would shadow a hook that nn.Module stores as a parameter or submodule.

    # Attributes of the transformers class this is mixed into (typed Any: each class declares its own).
    in_proj: Any
    out_proj: Any
    conv1d: Any
    norm: Any
    A_log: Any
    D: Any
    dt_bias: Any
    intermediate_size: Any
    num_heads: Any
    head_dim: Any
    n_groups: Any
    chunk_size: Any
    time_step_limit: Any
    activation: Any
    act: Any
    layer_idx: Any

    def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                *, cache_params: Any = None, **kwargs: Any) -> torch.Tensor:
        cache = cache if cache is not None else cache_params
        if cache is not None:
            active = [h for h in STATE_HOOKS if self._hook(h) is not None]
            if not active:
                return super().forward(hidden_states, cache=cache, attention_mask=attention_mask,  # type: ignore[misc]
                                       **kwargs)
            # transformers' cached path would skip these hooks. A first call (an eval forward, or a prefill)
            # runs the project's scan and leaves the cache empty; a second call would decode from that empty
            # state, so it raises.
            seen = cache.__dict__.setdefault("_peft_uncached_layers", set())
            if self.layer_idx in seen:
                raise RuntimeError(f"{', '.join(active)} cannot decode from a generation cache (transformers' "
                                   "cached path does not apply it): generate with use_cache=False")
            seen.add(self.layer_idx)
        for packed in ("seq_idx", "cu_seqlens"):
            if kwargs.get(packed) is not None:
                raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): packed sequences ({packed}) are "
                                 "not supported by the project's Mamba-2 forward")
        if hidden_states.is_cuda:
            fused = fused_kernels.for_cuda_forward(self, _fused_kernel(), fused_kernels.mamba2_kernel,
                                                   self.fused_blockers())
            if fused is not None:
                return self._fused_forward(hidden_states, attention_mask, fused)
        return self._ssd_forward(hidden_states, attention_mask)

    def fused_blockers(self) -> list[str]:
        """What this mixer's forward needs that mamba-ssm's fused kernel does not take (empty: it can run)."""
        blockers = []
        if self.scan_impl != "auto":
            blockers.append(f"model.scan is {self.scan_impl}")
        hooks = [h for h in HOOKS if h not in FUSED_HOOKS and self._hook(h) is not None]
        if self.out_proj._forward_hooks and not hooks:
            hooks = ["a forward hook on out_proj"]
        if hooks:
            blockers.append(f"the fused kernel cannot apply {', '.join(hooks)}")
        if self._state_size() != self._initial_state_size():
            blockers.append("the initial state has fewer state dimensions than the scan")
        conv_dim = self.conv1d.weight.shape[0]
        if conv_dim % CONV_CHANNEL_MULTIPLE:
            blockers.append(f"conv1d has {conv_dim} channels, not a multiple of {CONV_CHANNEL_MULTIPLE} (mamba-ssm's "
                            "causal-conv1d asserts it; additional-scan's grown state gives such a count)")
        return blockers

    def _hook(self, name: str) -> Any:
        return getattr(self, name, None)

    def _state_size(self) -> int:
        conv_dim = self.conv1d.weight.shape[0]
        return (conv_dim - self.intermediate_size) // (2 * self.n_groups)

    def _initial_state_size(self) -> int:
        h0 = self._hook("initial_state")
        return self._state_size() if h0 is None else h0.shape[-1]

    def _fused_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                       fused: Any) -> torch.Tensor:
        """mamba-ssm's fused kernel (conv, scan, gated norm and out_proj in one), handed the effective weights."""
        if attention_mask is not None:  # as transformers' fused branch: right padding only reaches padded outputs
            hidden_states = hidden_states * attention_mask[..., None].to(hidden_states.dtype)
        zxbcdt = self.in_proj(hidden_states)  # [Bt, L, I + conv_dim + H]
        h0 = self._hook("initial_state")  # [H, P, N]
        if h0 is not None:
            h0 = h0.float()[None].expand(hidden_states.shape[0], *h0.shape).contiguous()  # [Bt, H, P, N]
        return fused(zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias,
                     -torch.exp(self.A_log.float()), D=self.D, chunk_size=self.chunk_size, initial_states=h0,
                     dt_limit=tuple(self.time_step_limit), activation=self.activation,
                     rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.variance_epsilon,
                     outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias, headdim=self.head_dim,
                     ngroups=self.n_groups, norm_before_gate=False)

    def _ssd_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        bt, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        inner, heads, groups, p = self.intermediate_size, self.num_heads, self.n_groups, self.head_dim
        conv_dim = self.conv1d.weight.shape[0]
        n_state = self._state_size()
        mask = None if attention_mask is None else attention_mask.to(dtype)  # [Bt, L]
        if mask is not None:
            hidden_states = hidden_states * mask[..., None]
        zxbcdt = self.in_proj(hidden_states)  # [Bt, L, I + conv_dim + H]
        if zxbcdt.shape[-1] != inner + conv_dim + heads or conv_dim != inner + 2 * groups * n_state:
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): in_proj gives {zxbcdt.shape[-1]} "
                             f"outputs and conv1d has {conv_dim} channels; they must be I + conv_dim + H = "
                             f"{inner} + conv_dim + {heads} and conv_dim = I + 2 G N' (G = {groups})")
        z, xbc, dt = zxbcdt.split([inner, conv_dim, heads], dim=-1)  # [Bt, L, I], [Bt, L, conv_dim], [Bt, L, H]

        affix = self._hook("affix_tokens")
        if affix is not None and not isinstance(affix, torch.Tensor):
            affix = affix()  # a projection computes them
        n_affix = 0 if affix is None else affix.shape[0]
        if affix is not None:  # [n, conv_dim]
            xbc = torch.cat([affix.to(xbc.dtype).expand(bt, -1, -1), xbc], dim=1)  # [Bt, n + L, conv_dim]
            dt = torch.cat([dt.new_zeros(bt, n_affix, heads), dt], dim=1)  # [Bt, n + L, H]
            if mask is not None:
                mask = torch.cat([mask.new_ones(bt, n_affix), mask], dim=1)  # [Bt, n + L]
        conv_state = self._hook("conv_state")  # [K-1, conv_dim]
        if conv_state is not None:
            xbc = torch.cat([conv_state.to(xbc.dtype).expand(bt, -1, -1), xbc], dim=1)  # [Bt, K-1 + L', conv_dim]
        conv_impl = "torch" if self.scan_impl == "reference" else self.scan_impl
        if self.activation in ("silu", "swish"):
            xbc = causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, silu=True, impl=conv_impl)
        else:
            xbc = self.act(causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, silu=False, impl=conv_impl))
        if conv_state is not None:
            xbc = xbc[:, conv_state.shape[0]:]  # [Bt, L', conv_dim]
        if mask is not None:
            xbc = xbc * mask[..., None]
        total = xbc.shape[1]  # L' = n + L
        x, B, C = xbc.split([inner, groups * n_state, groups * n_state], dim=-1)
        x = x.reshape(bt, total, heads, p)  # [Bt, L', H, P]
        B = B.reshape(bt, total, groups, n_state)  # [Bt, L', G, N']
        C = C.reshape(bt, total, groups, n_state)  # [Bt, L', G, N']
        dt = discretize_dt(dt, self.dt_bias, tuple(self.time_step_limit))  # [Bt, L', H]
        A = -torch.exp(self.A_log.float())  # [H]
        h0 = self._hook("initial_state")  # [H, P, N'']
        if h0 is not None:
            h0 = F.pad(h0.float(), (0, n_state - h0.shape[-1]))[None]  # [1, H, P, N']
        if self.scan_impl == "reference":
            y, _ = reference_scan(x, dt, A, B, C, D=self.D, initial_state=h0)  # [Bt, L', H, P]
        else:
            y, _ = ssd_scan(x, dt, A, B, C, D=self.D, initial_state=h0)  # [Bt, L', H, P]
        offset = self._hook("state_offset")  # [H, P, N'']
        if offset is not None:
            r = heads // groups
            with torch.autocast(device_type=y.device.type, enabled=False):  # in fp32, like the scan
                o = offset.float().view(groups, r, p, offset.shape[-1])  # [G, R, P, N'']
                read = torch.einsum("blgn,grpn->blgrp", C[..., : offset.shape[-1]].float(), o)  # [Bt, L', G, R, P]
            y = y + read.reshape(bt, total, heads, p)
        if n_affix:
            y = y[:, n_affix:]  # [Bt, L, H, P]; the affix positions are dropped
        y = self.norm(y.reshape(bt, length, inner), z)  # [Bt, L, I], gated by silu(z)
        return self.out_proj(y.to(dtype))  # [Bt, L, D]


class FastMamba2Mixer(FastSSDForward, Mamba2Mixer):
    """transformers' ``Mamba2Mixer`` with the project's forward."""


class FastBambaMixer(FastSSDForward, BambaMixer):
    """transformers' ``BambaMixer`` with the project's forward."""


class FastGraniteMoeHybridMambaLayer(FastSSDForward, GraniteMoeHybridMambaLayer):
    """transformers' ``GraniteMoeHybridMambaLayer`` with the project's forward."""


class FastNemotronHMamba2Mixer(FastSSDForward, NemotronHMamba2Mixer):
    """transformers' ``NemotronHMamba2Mixer`` with the project's forward."""


# transformers' class -> its fast subclass. Named classes (not made on the fly) so that a model pickles.
FAST_CLASSES: dict[type[nn.Module], type[FastSSDForward]] = {
    Mamba2Mixer: FastMamba2Mixer,
    BambaMixer: FastBambaMixer,
    GraniteMoeHybridMambaLayer: FastGraniteMoeHybridMambaLayer,
    NemotronHMamba2Mixer: FastNemotronHMamba2Mixer,
}


def install_fast_mamba2_mixer(lm: nn.Module, scan: Impl = "auto") -> int:
    """Switch every Mamba-2-structured mixer in ``lm`` (see ``FAST_CLASSES``) to its fast subclass, with the
    convolution of ``scan`` (``reference``: the sequential scan loop, for tests); returns how many."""
    count = 0
    for module in lm.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if isinstance(module, FastSSDForward):
            module.scan_impl = scan
            count += 1
    if count == 0:
        raise ValueError(f"{type(lm).__name__} has no Mamba-2 mixer ({', '.join(c.__name__ for c in FAST_CLASSES)}):"
                         " not a Mamba-2 model or a supported hybrid")
    return count
