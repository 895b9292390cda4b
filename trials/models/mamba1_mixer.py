"""The project's Mamba-1 mixer forward: transformers' ``MambaMixer`` with the selective scan of
``trials.models.scan`` and the hooks PEFT methods need.

``install_fast_mixer(lm)`` switches every mixer of a Hugging Face Mamba model to ``FastMambaMixer`` (a
subclass; weights, state dict and ``save_pretrained`` are unchanged). Its forward:
- reads every weight through its module attribute (``self.conv1d.weight``, ``self.x_proj.weight``, ...), so
  a parametrised weight (W + delta) is the weight used, on every path;
- takes the state size from ``A_log`` (extra state dimensions: ``A_log`` [E, N + n] with ``x_proj`` giving
  R + 2(N + n) outputs);
- starts the scan from ``mixer.initial_state`` ([E, N'] with N' <= N, zero-padded to the state size) and the
  convolution from ``mixer.conv_state`` ([K-1, E], the inputs it has "already seen") when a method sets them;
- prepends ``mixer.affix_tokens`` ([n, E], or a callable returning it) to the x half of the ``in_proj``
  output before the convolution and drops those positions after the scan (their z half could only gate
  outputs that are dropped, so it is zero);
- adds the state offset silu(z_t) * (H C_t) of ``mixer.state_offset`` (H [E, N'], N' <= N) to the scan output;
- zeroes padded positions (``attention_mask``) before ``in_proj`` and after the convolution, as
  transformers does.
With a generation cache it defers to transformers' cached path, which knows none of the hooks above except
the parallel adapter: with one of them set, the first call runs the project's scan (so an eval forward works)
and a decoding step raises rather than generate from a different model. On CUDA with ``model.scan: auto`` it calls
mamba-ssm's fused kernel with the effective weights (a padded batch too: padded positions are zeroed before
``in_proj``, and right padding only reaches padded outputs through the causal conv and scan); it runs the torch scan
when the kernel cannot run here, when ``model.scan`` is ``torch``, or when a hook (or a LoRA-dropout forward hook
on x_proj / out_proj) or the activation needs what the kernel does not take, and ``trials.models.fused`` says why.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.mamba.modeling_mamba import MambaMixer

from trials.models import fused
from trials.models.scan import Impl, causal_conv, selective_scan_tokens

# transformers 5.24 renamed the mixer's generation-cache argument from ``cache_params`` to ``cache`` (the old name
# is deprecated until 5.40). The mixer accepts both and hands the cache on under the installed version's name.
CACHE_KWARG = "cache" if "cache" in inspect.signature(MambaMixer.forward).parameters else "cache_params"
CACHE_KWARGS = ("cache", "cache_params")

HOOKS = ("initial_state", "conv_state", "affix_tokens", "state_offset", "parallel_adapter")  # set by methods
STATE_HOOKS = HOOKS[:4]  # what transformers' cached generation path would silently skip


def _cuda_kernels() -> Any:
    """mamba-ssm's fused ``mamba_inner_fn``, or None where it cannot run here (``fused.mamba1_kernel`` says why)."""
    return fused.mamba1_kernel()[0]


class FastMambaMixer(MambaMixer):
    scan_impl: Impl = "auto"

    def forward(self, hidden_states: torch.Tensor, cache: Any = None,
                attention_mask: torch.Tensor | None = None, *, cache_params: Any = None,
                **kwargs: Any) -> torch.Tensor:
        cache = cache if cache is not None else cache_params
        if cache is not None:
            active = [h for h in STATE_HOOKS if getattr(self, h, None) is not None]
            if not active:
                return super().forward(hidden_states, attention_mask=attention_mask, **{CACHE_KWARG: cache},
                                       **kwargs)
            # transformers' cached path would skip these hooks. A first call (an eval forward, or a prefill)
            # runs the project's scan and leaves the cache empty; a second call would decode from that empty
            # state, so it raises.
            seen = cache.__dict__.setdefault("_peft_uncached_layers", set())
            if self.layer_idx in seen:
                raise RuntimeError(f"{', '.join(active)} cannot decode from a generation cache (transformers' "
                                   "cached path does not apply it): generate with use_cache=False")
            seen.add(self.layer_idx)
        if hidden_states.is_cuda:
            mamba_inner_fn = fused.for_cuda_forward(self, _cuda_kernels(), fused.mamba1_kernel, self.fused_blockers())
            if mamba_inner_fn is not None:
                return self._fused_cuda_forward(hidden_states, attention_mask, mamba_inner_fn)
        return self._scan_forward(hidden_states, attention_mask)

    def fused_blockers(self) -> list[str]:
        """What this mixer's forward needs that mamba-ssm's ``mamba_inner_fn`` does not take (empty: it can run)."""
        blockers = []
        if self.scan_impl != "auto":
            blockers.append(f"model.scan is {self.scan_impl}")
        hooks = [h for h in HOOKS if getattr(self, h, None) is not None]
        hooks += [f"a forward hook on {name}" for name in ("x_proj", "out_proj", "dt_proj")
                  if getattr(self, name)._forward_hooks]
        if hooks:
            blockers.append("the fused kernel cannot apply " + ", ".join(hooks))
        if self.activation != "silu":
            blockers.append(f"the fused kernel applies silu, this model's activation is {self.activation}")
        return blockers

    def _fused_cuda_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                            mamba_inner_fn: Any) -> torch.Tensor:
        """mamba-ssm's fused kernel, handed the effective weights (a parametrised weight is W + delta here)."""
        if attention_mask is not None:  # as transformers' fused branch: right padding only reaches padded outputs
            hidden_states = hidden_states * attention_mask[..., None].to(hidden_states.dtype)
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
        x, z = xz.chunk(2, dim=-1)  # [Bt, L, E] each
        affix = getattr(self, "affix_tokens", None)
        if affix is not None and not isinstance(affix, torch.Tensor):
            affix = affix()  # a projection computes them
        n_affix = 0 if affix is None else affix.shape[0]
        if affix is not None:  # [n, E]
            x = torch.cat([affix.to(x.dtype).expand(bt, -1, -1), x], dim=1)  # [Bt, n + L, E]
            z = torch.cat([z.new_zeros(bt, n_affix, z.shape[-1]), z], dim=1)  # [Bt, n + L, E]
            if mask is not None:
                mask = torch.cat([mask.new_ones(bt, n_affix), mask], dim=1)  # [Bt, n + L]
        conv_state = getattr(self, "conv_state", None)  # [K-1, E]
        if conv_state is not None:
            x = torch.cat([conv_state.to(x.dtype).expand(bt, -1, -1), x], dim=1)  # [Bt, K-1 + L', E]
        if self.activation == "silu":
            x = causal_conv(x, self.conv1d.weight, self.conv1d.bias, silu=True, impl=self.scan_impl)
        else:
            x = self.act(causal_conv(x, self.conv1d.weight, self.conv1d.bias, silu=False, impl=self.scan_impl))
        if conv_state is not None:
            x = x[:, conv_state.shape[0] :]  # [Bt, L', E]
        if mask is not None:
            x = x * mask[..., None]
        n_state = self.A_log.shape[1]
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, n_state, n_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # [Bt, L', E]
        A = -torch.exp(self.A_log.float())  # [E, N]
        h0 = getattr(self, "initial_state", None)  # [E, N']
        if h0 is not None:
            h0 = F.pad(h0.float(), (0, n_state - h0.shape[-1]))[None]  # [1, E, N]
        y = selective_scan_tokens(x, dt, A, B, C, D=self.D, z=z, delta_bias=self.dt_proj.bias,
                                  delta_softplus=True, initial_state=h0, impl=self.scan_impl)  # [Bt, L', E]
        offset = getattr(self, "state_offset", None)  # [E, N']
        if offset is not None:
            with torch.autocast(device_type=y.device.type, enabled=False):  # in fp32, like the scan
                shift = F.silu(z.float()) * (C[..., : offset.shape[1]].float() @ offset.float().T)  # [Bt, L', E]
            y = y + shift.to(y.dtype)
        if n_affix:
            y = y[:, n_affix:]  # the affix positions are dropped
        return self.out_proj(y.to(hidden_states.dtype))  # [Bt, L, D]


class TransformersPathMambaMixer(MambaMixer):
    """transformers' own forward (``model.scan`` mambapy or hf_loop) with every projection a method hooks called as a
    module. In training, transformers hands ``x_proj``'s and ``out_proj``'s weights to a fused kernel wherever one is
    installed (CUDA), which would skip a parallel adapter's and LoRA dropout's forward hooks while evaluation runs
    them; with such a hook set, the forward takes transformers' unfused branch, which calls the modules."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hooked = bool(self.x_proj._forward_hooks or self.out_proj._forward_hooks or self.dt_proj._forward_hooks)
        if not (hooked and self.training):
            return super().forward(*args, **kwargs)
        self.training = False  # transformers' fused shortcut is taken only in training (its flag, not submodules')
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.training = True


def install_transformers_mixer(lm: Any, scan: str) -> None:
    """Keep transformers' own Mamba-1 forward (``mambapy``: its parallel scan; ``hf_loop``: its sequential loop), with
    the hooks of ``TransformersPathMambaMixer`` honoured."""
    for module in lm.modules():
        if isinstance(module, MambaMixer):
            if type(module) in (MambaMixer, FastMambaMixer):
                module.__class__ = TransformersPathMambaMixer
            module.use_mambapy = scan == "mambapy"


def install_fast_mixer(lm: Any, impl: Impl = "auto") -> int:
    """Switch every ``MambaMixer`` in ``lm`` to ``FastMambaMixer`` with scan ``impl``; returns how many."""
    count = 0
    for module in lm.modules():
        if isinstance(module, MambaMixer):
            if type(module) in (MambaMixer, TransformersPathMambaMixer):
                module.__class__ = FastMambaMixer
            if isinstance(module, FastMambaMixer):
                module.scan_impl = impl
                count += 1
    if count == 0:
        raise ValueError(f"{type(lm).__name__} has no MambaMixer modules: not a Mamba-1 model")
    return count
