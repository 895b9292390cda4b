"""The CUDA kernel path, checked on CPU: what detects mamba-ssm's compiled pieces, which forwards may take the fused
kernel and why not, how a fallback is said and recorded, and the Mamba-1 fused call site (with a stand-in kernel of
the same signature) on a padded batch."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from trials.models import fused
from trials.models.fixtures import tiny_model
from trials.models.loading import use_scan
from trials.models.scan import causal_conv, selective_scan_tokens


@pytest.fixture
def clean_probes():
    fused.mamba1_kernel.cache_clear()
    fused.mamba2_kernel.cache_clear()
    fused.reset()
    fused._warned.clear()
    yield
    fused.mamba1_kernel.cache_clear()
    fused.mamba2_kernel.cache_clear()
    fused.reset()
    fused._warned.clear()


def _install_fake_mamba_ssm(monkeypatch, conv_function, compiled: bool = True) -> object:
    """``mamba_ssm.ops.selective_scan_interface`` as mamba-ssm 2.2.5+ leaves it: causal-conv1d's function bound to a
    name (None when causal-conv1d's compiled functions are missing), and ``selective_scan_cuda`` importable or not."""
    def kernel(*args, **kwargs):
        return "fused"

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.causal_conv1d_fwd_function = conv_function  # type: ignore[attr-defined]
    interface.mamba_inner_fn = kernel  # type: ignore[attr-defined]
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    scan = types.ModuleType("selective_scan_cuda") if compiled else None
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", scan)
    return kernel


def test_without_mamba_ssm_the_kernel_is_missing_and_the_reason_names_the_import(clean_probes, monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # as an extension built for another torch fails to import
    for probe in (fused.mamba1_kernel, fused.mamba2_kernel):
        fn, reason = probe()
        assert fn is None and reason.startswith("mamba-ssm cannot be imported (") and "mamba_ssm" in reason


def test_mamba_ssm_that_imports_without_causal_conv1d_s_compiled_functions_is_not_a_kernel(clean_probes, monkeypatch):
    _install_fake_mamba_ssm(monkeypatch, conv_function=None)
    fn, reason = fused.mamba1_kernel()
    assert fn is None
    assert "causal-conv1d's compiled functions are missing" in reason and "causal_conv1d_fwd_function is None" in reason


def test_mamba_ssm_without_its_compiled_scan_is_not_a_kernel(clean_probes, monkeypatch):
    _install_fake_mamba_ssm(monkeypatch, conv_function=print, compiled=False)
    fn, reason = fused.mamba1_kernel()
    assert fn is None and "selective_scan_cuda cannot be imported" in reason


def test_with_every_compiled_piece_the_kernel_is_found(clean_probes, monkeypatch):
    kernel = _install_fake_mamba_ssm(monkeypatch, conv_function=print)
    assert fused.mamba1_kernel() == (kernel, "")


def test_a_fallback_is_said_once_at_warning_and_recorded_for_the_trial(clean_probes, caplog):
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        for _ in range(3):
            assert fused.choose("FastMambaMixer", (None, "mamba-ssm cannot be imported"), []) is None
    said = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "FastMambaMixer runs the torch scan on CUDA" in said[0].getMessage()
    assert fused.kernel_label() == "torch: mamba-ssm cannot be imported"
    fused.reset()
    assert fused.kernel_label() is None  # a CPU trial records nothing
    assert fused.choose("FastMambaMixer", (print, ""), []) is print
    assert fused.kernel_label() == "fused"
    assert fused.choose("FastMambaMixer", (print, ""), ["model.scan is torch"]) is None
    assert fused.kernel_label() == "torch: model.scan is torch (1 forwards fused)"


def _mamba1(scan: str = "auto"):
    return use_scan(tiny_model("mamba"), scan).backbone.layers[0].mixer


def test_mamba1_takes_the_fused_kernel_unless_the_scan_a_hook_or_the_activation_rules_it_out():
    assert _mamba1().fused_blockers() == []
    assert _mamba1("torch").fused_blockers() == ["model.scan is torch"]
    mixer = _mamba1()
    mixer.initial_state = torch.nn.Parameter(torch.zeros(64, 4))
    mixer.x_proj.register_forward_hook(lambda mod, inp, out: out)
    assert mixer.fused_blockers() == ["the fused kernel cannot apply initial_state, a forward hook on x_proj"]
    mixer = _mamba1()
    mixer.activation = "relu"
    assert mixer.fused_blockers() == ["the fused kernel applies silu, this model's activation is relu"]


def test_mamba2_leaves_the_fused_kernel_when_additional_scan_makes_the_conv_channels_no_multiple_of_8():
    from space.methods import AdditionalScanConfig
    from trials.methods import apply_methods

    lm = use_scan(tiny_model("bamba"), "auto")
    mixer = next(m for m in lm.modules() if hasattr(m, "fused_blockers"))
    assert mixer.fused_blockers() == []
    apply_methods(lm, {"additional_scan": AdditionalScanConfig(states=1)})  # conv channels 96 -> 98
    said = mixer.fused_blockers()
    assert len(said) == 1 and "conv1d has 98 channels, not a multiple of 8" in said[0]


def stand_in_mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                            out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True):
    """``mamba_inner_fn``'s contract (xz [Bt, 2E, L] in, [Bt, L, D] out, B and C read from x_proj) in torch ops."""
    x, z = xz.transpose(1, 2).chunk(2, dim=-1)  # [Bt, L, E] each
    x = causal_conv(x, conv1d_weight, conv1d_bias, silu=True, impl="torch")
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    dt, b, c = torch.split(F.linear(x, x_proj_weight), [rank, n, n], dim=-1)
    y = selective_scan_tokens(x, F.linear(dt, delta_proj_weight), A, b, c, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, impl="torch")  # [Bt, L, E]
    return F.linear(y, out_proj_weight, out_proj_bias)


def test_the_mamba1_fused_call_site_stays_fused_on_a_padded_batch_and_matches_the_scan_at_real_positions():
    mixer = _mamba1("torch")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 32, generator=g)  # [Bt, L, D]
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])  # right padding
    want = mixer._scan_forward(hidden, mask)
    got = mixer._fused_cuda_forward(hidden, mask, stand_in_mamba_inner_fn)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5, rtol=1e-4)
    unmasked = mixer._fused_cuda_forward(hidden, None, stand_in_mamba_inner_fn)
    assert torch.allclose(unmasked[real], got[real], atol=1e-5, rtol=1e-4)  # padding after them changes nothing
    assert not torch.allclose(unmasked[~real], got[~real], atol=1e-3)  # the comparison can fail: padding is masked


def test_the_cuda_extra_asks_for_a_mamba_ssm_and_causal_conv1d_that_work_together():
    """mamba-ssm >= 2.2.5 calls causal-conv1d's cpp_functions, which causal-conv1d has from 1.5.1 on."""
    import tomllib
    from packaging.requirements import Requirement

    from tests.conftest import REPO

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    wanted = {r.name: r.specifier for r in map(Requirement, extra)}
    assert set(wanted) == {"mamba-ssm", "causal-conv1d"}
    assert "2.2.4" not in wanted["mamba-ssm"] and "2.2.5" in wanted["mamba-ssm"]
    assert "1.5.0" not in wanted["causal-conv1d"] and "1.5.1" in wanted["causal-conv1d"]


def test_transformers_own_path_calls_a_hooked_projection_as_a_module_in_training(monkeypatch):
    """With mamba-ssm on CUDA, transformers' training branch hands out_proj's weight to its fused kernel, skipping a
    parallel adapter's forward hook: with a hook set, the project keeps that branch off (simulated here on CPU)."""
    import transformers.models.mamba.modeling_mamba as modeling

    from space.methods import AdapterConfig
    from trials.methods import apply_methods

    calls = []

    def shortcut(xz, *args, **kwargs):  # the fused kernel as transformers calls it on CUDA: out_proj's weight only
        calls.append(1)
        return torch.zeros(xz.shape[0], xz.shape[2], args[4].shape[0])  # [Bt, L, D] from out_proj.weight [D, E]

    monkeypatch.setattr(modeling, "mamba_inner_fn", shortcut)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    lm = use_scan(tiny_model("mamba"), "mambapy").train()
    lm(ids, use_cache=False)
    assert calls  # without a hook, transformers' shortcut runs (so this test can see it)
    calls.clear()
    applied = apply_methods(lm, {"parallel_adapter": AdapterConfig(rank=2)})
    trained = lm(ids, use_cache=False).logits
    assert calls == []
    assert torch.allclose(trained, lm.eval()(ids, use_cache=False).logits, atol=1e-6)
    trained.sum().backward()
    grads = [p.grad for g in applied.param_groups(1e-3, 0.0) for p in g["params"]]
    # the hook ran in training: the adapter gets a gradient (its zero-initialised up-projection, at least)
    assert grads and all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def test_a_cuda_forward_with_the_cpu_kernel_asked_for_is_an_error_and_a_withheld_kernel_says_why(clean_probes):
    mixer = types.SimpleNamespace(scan_impl="compiled")
    with pytest.raises(ValueError, match="model.scan: 'compiled' is the CPU kernel and cannot run on CUDA"):
        fused.for_cuda_forward(mixer, print, fused.mamba1_kernel, [])
    mixer.scan_impl = "auto"
    assert fused.for_cuda_forward(mixer, None, lambda: (None, "mamba-ssm cannot be imported"), []) is None
    assert fused.kernel_label() == "torch: mamba-ssm cannot be imported"
    assert fused.for_cuda_forward(mixer, print, lambda: (None, ""), []) is print
