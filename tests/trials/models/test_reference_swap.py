"""The fused CUDA call sites against mamba-ssm's own code, on the CPU.

mamba-ssm ships pure-PyTorch references with its fused functions' signatures: ``mamba_inner_ref`` (Mamba-1) and
``mamba_split_conv1d_scan_ref`` (Mamba-2), over ``selective_scan_ref``, causal-conv1d's ``causal_conv1d_ref`` and
``rms_norm_ref``. Here they are swapped in for the kernels, and every method that stays on the fused path gets, from
the very arguments the project passes on CUDA, the torch path's outputs and gradients, on Mamba-1, Mamba-2 and a
hybrid. A renamed or reordered upstream argument fails here, in CI, not on a lent GPU.

The sources are mamba-ssm's and causal-conv1d's, unpacked by ``make test`` into ``.venv/mamba-ref`` (never built, so
their compiled modules are stubbed); their Triton modules import with the ``triton`` of the dev extra.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from tests.conftest import REPO
from trials.methods import REGISTRY, apply_methods, supported
from trials.models import fused
from trials.models.fixtures import tiny_model
from trials.models.loading import use_scan
from trials.models.mamba1_mixer import FastMambaMixer
from trials.models.mamba2_mixer import FastSSDForward

SOURCES = REPO / ".venv" / "mamba-ref"
COMPILED = ("selective_scan_cuda", "causal_conv1d_cuda")  # the extensions a CPU machine has no build of


@pytest.fixture(scope="module")
def upstream():
    """``(mamba1 kernel, mamba2 kernel)``: mamba-ssm's references, with their own inner kernels swapped for their
    references too; everything imported here is removed again afterwards (other tests see no mamba-ssm)."""
    if not (SOURCES / "mamba_ssm").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SOURCES} is missing: make test unpacks mamba-ssm's sources there")
        pytest.skip(f"mamba-ssm's sources are not in {SOURCES} (make test unpacks them)")
    before_modules, before_path = set(sys.modules), list(sys.path)
    sys.path.insert(0, str(SOURCES))
    for name in COMPILED:
        sys.modules[name] = types.ModuleType(name)
    swaps: list[tuple[object, str, object]] = []
    try:
        import causal_conv1d.causal_conv1d_interface as conv
        import mamba_ssm.ops.selective_scan_interface as scan
        import mamba_ssm.ops.triton.layernorm_gated as norm
        import mamba_ssm.ops.triton.ssd_combined as ssd

        # mamba_split_conv1d_scan_combined normalises per group (group_size = dim // ngroups) but its reference
        # over the whole width: the swapped norm is given the kernel's grouping.
        groups = [1]

        def rmsnorm(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
            return norm.rms_norm_ref(x, weight, bias, z=z, eps=eps, group_size=x.shape[-1] // groups[0],
                                     norm_before_gate=norm_before_gate)

        for module, name, value in ((scan, "causal_conv1d_fn", conv.causal_conv1d_ref),
                                    (scan, "selective_scan_fn", scan.selective_scan_ref),
                                    (ssd, "causal_conv1d_fn", conv.causal_conv1d_ref),
                                    (ssd, "rmsnorm_fn", rmsnorm)):
            swaps.append((module, name, getattr(module, name)))
            setattr(module, name, value)

        def mamba2(*args, initial_states=None, **kwargs):
            assert initial_states is None, "mamba_split_conv1d_scan_ref takes no initial state"
            groups[0] = kwargs.get("ngroups", 1)
            return ssd.mamba_split_conv1d_scan_ref(*args, **kwargs)

        yield scan.mamba_inner_ref, mamba2
    finally:
        for module, name, value in swaps:
            setattr(module, name, value)
        for name in set(sys.modules) - before_modules:
            del sys.modules[name]
        sys.path[:] = before_path
        fused.mamba1_kernel.cache_clear()
        fused.mamba2_kernel.cache_clear()


def fused_call(kernel, call_site: str):
    """A mixer forward that takes the fused call site, with ``kernel`` as the kernel, wherever nothing blocks it."""
    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        if self.fused_blockers():
            return self._scan_forward(hidden_states, attention_mask) if isinstance(self, FastMambaMixer) else \
                self._ssd_forward(hidden_states, attention_mask)
        forward.calls += 1
        return getattr(self, call_site)(hidden_states, attention_mask, kernel)
    forward.calls = 0
    return forward


def outputs_and_grads(lm, ids, mask):
    lm.zero_grad(set_to_none=True)
    logits = lm(ids, attention_mask=mask, use_cache=False).logits
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


ARCHS = {"mamba": (FastMambaMixer, "_fused_cuda_forward", 0), "mamba2": (FastSSDForward, "_fused_forward", 1),
         "bamba": (FastSSDForward, "_fused_forward", 1)}


def cases():
    from tests.trials.methods.test_methods_mamba2 import config

    out = []
    for arch in ARCHS:
        for name in REGISTRY:
            if supported(name, arch) is None and name not in ("sdt", "lora_embeddings"):
                out.append(pytest.param(arch, name, config(name), id=f"{arch}-{name}"))
    return out


@pytest.mark.parametrize(("arch", "method", "cfg"), cases())
def test_the_fused_call_site_with_mamba_ssm_s_reference_gives_the_torch_path_s_outputs_and_gradients(
        upstream, monkeypatch, arch, method, cfg):
    mixer_class, call_site, which = ARCHS[arch]
    torch.manual_seed(0)
    lm = use_scan(tiny_model(arch), "auto").eval()
    applied = apply_methods(lm, {method: cfg})
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every method tensor off its init, so no gradient is trivially equal
        for params in applied.params.values():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row: the fused call masks it as the torch path does
    want, want_grads = outputs_and_grads(lm, ids, mask)
    forward = fused_call(upstream[which], call_site)
    monkeypatch.setattr(mixer_class, "forward", forward)
    got, got_grads = outputs_and_grads(lm, ids, mask)
    if forward.calls == 0:
        pytest.skip(f"{method} leaves the fused kernel on {arch} (its reason is tested in test_fused.py)")
    real = mask.bool()
    assert rel(got[real], want[real]) < 1e-4
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert rel(got_grads[name], g) < 1e-3, name
