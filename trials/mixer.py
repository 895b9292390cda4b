"""The project's Mamba-1 mixer forward: transformers' ``MambaMixer`` with the selective scan of
``trials.scan`` and the hooks PEFT methods need.

``install_fast_mixer(lm)`` switches every mixer of a Hugging Face Mamba model to ``FastMambaMixer`` (a
subclass; weights, state dict and ``save_pretrained`` are unchanged). Its forward:
- reads every weight through its module attribute (``self.conv1d.weight``, ``self.x_proj.weight``, ...), so
  a parametrised weight (W + delta) is the weight used, on every path;
- takes the state size from ``A_log`` (extra state dimensions: ``A_log`` [E, N + n] with ``x_proj`` giving
  R + 2(N + n) outputs);
- starts the scan from ``mixer.initial_state`` ([E, N] or [Bt, E, N]) when a method sets one;
- prepends ``mixer.affix_tokens`` ([n, 2E]) to the ``in_proj`` output before the convolution and drops
  those positions after the scan;
- zeroes padded positions (``attention_mask``) before ``in_proj`` and after the convolution, as
  transformers does.
With a generation cache it defers to transformers' cached path. On CUDA with mamba-ssm installed it calls the
fused kernels with the effective weights, and falls back to the torch scan when they are missing or when a
hook (initial state, affix) needs what the fused kernel does not take.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.mamba.modeling_mamba import MambaMixer

from trials.scan import Impl, causal_conv, selective_scan_tokens

HOOKS = ("initial_state", "affix_tokens", "parallel_adapter")  # set by methods; all need the torch path


def _cuda_kernels() -> Any:
    """mamba-ssm's fused ``mamba_inner_fn``, or None where it is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except ImportError:
        return None
    return mamba_inner_fn


class FastMambaMixer(MambaMixer):
    scan_impl: Impl = "auto"

    def forward(self, hidden_states: torch.Tensor, cache_params: Any = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if cache_params is not None:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask,
                                   **kwargs)
        hooks_active = any(getattr(self, h, None) is not None for h in HOOKS)
        if hidden_states.is_cuda and not hooks_active and attention_mask is None:
            mamba_inner_fn = _cuda_kernels()
            if mamba_inner_fn is not None:
                return self._fused_cuda_forward(hidden_states, mamba_inner_fn)
        return self._scan_forward(hidden_states, attention_mask)

    def _fused_cuda_forward(self, hidden_states: torch.Tensor, mamba_inner_fn: Any) -> torch.Tensor:
        """mamba-ssm's fused kernel, handed the effective weights (a parametrised weight is W + delta here)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)  # [Bt, 2E, L]
        A = -torch.exp(self.A_log.float())  # [E, N]
        return mamba_inner_fn(
            xz, self.conv1d.weight, self.conv1d.bias if self.use_conv_bias else None, self.x_proj.weight,
            self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias.float() if self.use_bias else None,
            A, None, None, self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True)

    def _scan_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # Token-major throughout ([Bt, L, .]), the layout the projections produce, so nothing is transposed.
        bt = hidden_states.shape[0]
        mask = None if attention_mask is None else attention_mask.to(hidden_states.dtype)  # [Bt, L]
        if mask is not None:
            hidden_states = hidden_states * mask[..., None]
        xz = self.in_proj(hidden_states)  # [Bt, L, 2E]
        affix = getattr(self, "affix_tokens", None)  # [n, 2E]
        n_affix = 0 if affix is None else affix.shape[0]
        if affix is not None:
            xz = torch.cat([affix.to(xz.dtype).expand(bt, -1, -1), xz], dim=1)  # [Bt, n + L, 2E]
            if mask is not None:
                mask = torch.cat([mask.new_ones(bt, n_affix), mask], dim=1)  # [Bt, n + L]
        x, z = xz.chunk(2, dim=-1)  # [Bt, L', E] each
        if self.activation == "silu":
            x = causal_conv(x, self.conv1d.weight, self.conv1d.bias, silu=True, impl=self.scan_impl)
        else:
            x = self.act(causal_conv(x, self.conv1d.weight, self.conv1d.bias, silu=False, impl=self.scan_impl))
        if mask is not None:
            x = x * mask[..., None]
        n_state = self.A_log.shape[1]
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, n_state, n_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # [Bt, L', E]
        A = -torch.exp(self.A_log.float())  # [E, N]
        h0 = getattr(self, "initial_state", None)
        if h0 is not None and h0.dim() == 2:
            h0 = h0[None]  # [1, E, N]
        y = selective_scan_tokens(x, dt, A, B, C, D=self.D, z=z, delta_bias=self.dt_proj.bias,
                                  delta_softplus=True, initial_state=h0, impl=self.scan_impl)  # [Bt, L', E]
        if n_affix:
            y = y[:, n_affix:]  # the affix positions are dropped
        return self.out_proj(y.to(hidden_states.dtype))  # [Bt, L, D]


def install_fast_mixer(lm: Any, impl: Impl = "auto") -> int:
    """Switch every ``MambaMixer`` in ``lm`` to ``FastMambaMixer`` with scan ``impl``; returns how many."""
    count = 0
    for module in lm.modules():
        if isinstance(module, MambaMixer):
            if type(module) is MambaMixer:
                module.__class__ = FastMambaMixer
            if isinstance(module, FastMambaMixer):
                module.scan_impl = impl
                count += 1
    if count == 0:
        raise ValueError(f"{type(lm).__name__} has no MambaMixer modules: not a Mamba-1 model")
    return count
