"""The project's Mamba-2 mixer on CUDA: mamba-ssm's fused kernel is handed the effective weights, and the torch
SSD path takes over (saying why) when a hook needs it. Marked ``gpu``: skipped without a CUDA device; the tests
of the fused kernel also need mamba-ssm."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.utils import parametrize

import trials.models.fused as fused
import trials.models.mamba2_mixer as mamba2_mixer
from tests.trials.models.test_mamba2_mixer import HEAD_DIM, HEADS, STATE, Delta, close, ids, mixers, pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_fused = pytest.mark.skipif(mamba2_mixer._fused_kernel() is None, reason="needs mamba-ssm")


def counting_fused(monkeypatch) -> list[int]:
    """Count the calls of the fused kernel (still running it)."""
    calls: list[int] = []
    kernel = mamba2_mixer._fused_kernel()

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(mamba2_mixer, "_fused_kernel", lambda: counted)
    return calls


def parametrise(lm) -> list[torch.nn.Parameter]:
    deltas = []
    for i, m in enumerate(mixers(lm)):
        for owner, name in ((m, "in_proj"), (m, "conv1d"), (m, "out_proj")):
            module = getattr(owner, name)
            delta = 0.1 * torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(i))
            parametrize.register_parametrization(module, "weight", Delta(delta))
        parametrize.register_parametrization(m, "A_log", Delta(0.1 * torch.randn(HEADS)))
    for m in mixers(lm):
        deltas += [p for n, p in m.named_parameters() if n.endswith(".delta")]
    return deltas


@needs_fused
def test_the_fused_kernel_gets_the_effective_weights_and_matches_the_cpu_path(monkeypatch):
    _, cpu = pair(2)
    parametrise(cpu)
    tokens = ids(64)
    want = cpu(tokens, use_cache=False).logits
    want.square().mean().backward()
    want_grads = [p.grad.clone() for p in cpu.parameters() if p.grad is not None]
    cpu.zero_grad()
    gpu = cpu.cuda()
    calls = counting_fused(monkeypatch)
    got = gpu(tokens.cuda(), use_cache=False).logits
    assert len(calls) == 2  # one per layer: no silent fallback
    assert close(got.cpu(), want, 1e-3)
    got.square().mean().backward()
    got_grads = [p.grad.cpu() for p in gpu.parameters() if p.grad is not None]
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert close(g, w, 1e-2)


@needs_fused
def test_an_initial_state_stays_on_the_fused_kernel(monkeypatch):
    _, cpu = pair(2)
    state = torch.randn(HEADS, HEAD_DIM, STATE, generator=torch.Generator().manual_seed(0))
    for m in mixers(cpu):
        m.initial_state = torch.nn.Parameter(state.clone())
    want = cpu(ids(), use_cache=False).logits
    gpu = cpu.cuda()
    calls = counting_fused(monkeypatch)
    got = gpu(ids().cuda(), use_cache=False).logits
    assert len(calls) == 2 and close(got.cpu(), want, 1e-3)
    got.square().mean().backward()
    assert all(m.initial_state.grad is not None and m.initial_state.grad.abs().sum() > 0 for m in mixers(gpu))


@needs_fused
@pytest.mark.parametrize("hook", ["state_offset", "conv_state", "affix_tokens", "parallel_adapter", "out_proj hook"])
def test_a_hook_the_fused_kernel_cannot_apply_falls_back_to_the_torch_path_and_says_so(hook, monkeypatch, caplog):
    _, cpu = pair(2)
    conv_dim = mixers(cpu)[0].conv1d.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    for m in mixers(cpu):
        if hook == "state_offset":
            m.state_offset = torch.randn(HEADS, HEAD_DIM, STATE, generator=g)
        elif hook == "conv_state":
            m.conv_state = torch.randn(3, conv_dim, generator=g)
        elif hook == "affix_tokens":
            m.affix_tokens = torch.randn(2, conv_dim, generator=g)
        else:  # a parallel adapter is the method's out_proj hook plus the mixer attribute
            m.out_proj.register_forward_hook(lambda mod, inp, out: out + inp[0][..., : out.shape[-1]])
            if hook == "parallel_adapter":
                m.parallel_adapter = torch.nn.Identity()
    want = cpu(ids(), use_cache=False).logits
    gpu = cpu.cuda()
    calls = counting_fused(monkeypatch)
    fused._warned.clear()
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        got = gpu(ids().cuda(), use_cache=False).logits
    assert calls == [] and close(got.cpu(), want, 1e-3)
    assert "runs the torch scan on CUDA, not mamba-ssm's fused kernel: the fused kernel cannot apply" in caplog.text


def test_without_mamba_ssm_the_torch_path_runs_on_cuda_and_matches_the_cpu_path(monkeypatch):
    _, cpu = pair(2)
    want = cpu(ids(), use_cache=False).logits
    monkeypatch.setattr(mamba2_mixer, "_fused_kernel", lambda: None)
    got = cpu.cuda()(ids().cuda(), use_cache=False).logits
    assert close(got.cpu(), want, 1e-4)
