"""The fast selective scans against the plain sequential reference, and the project's mixer against
transformers' own."""

from __future__ import annotations

import os
import secrets

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from tests.conftest import SCAN_PATHS
from trials.models import scan as scan_mod
from trials.models.loading import use_scan
from trials.models.mamba1_mixer import FastMambaMixer, install_fast_mixer
from trials.models.scan import selective_scan

FAST = ("compiled", "torch")
# (batch, channels, length, state): odd lengths, lengths no chunk size divides, a single step.
SHAPES = [(1, 4, 1, 3), (2, 8, 37, 5), (3, 16, 64, 16), (2, 6, 129, 7), (1, 3, 250, 4)]


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state (model inits, token ids), whatever ran before it; the
    state outside is restored afterwards."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def property_seed() -> int:
    """A new seed on every run, so the fast paths meet new inputs each time (property-style); the tests that use
    it name it in every failure message, and MAMBA_PEFT_TEST_SEED=<seed> replays it."""
    return int(os.environ.get("MAMBA_PEFT_TEST_SEED") or secrets.randbelow(2**31 - 1))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def scan_inputs(bt: int, e: int, length: int, n: int, h0: bool, gen: torch.Generator) -> list:
    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()

    a = (-(torch.rand(e, n, generator=gen) * 2 + 0.05)).requires_grad_()
    return [leaf(bt, e, length), leaf(bt, e, length, scale=0.5), a, leaf(bt, n, length), leaf(bt, n, length),
            leaf(e), leaf(bt, e, length), leaf(e, scale=0.5), leaf(1, e, n) if h0 else None]


def run_scan(inputs: list, impl: str, weight: torch.Tensor | None = None):
    for x in inputs:
        if x is not None:
            x.grad = None
    u, delta, a, b, c, d, z, bias, h0 = inputs
    y = selective_scan(u, delta, a, b, c, D=d, z=z, delta_bias=bias, initial_state=h0, impl=impl)
    w = weight if weight is not None else torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * w).sum().backward()
    return y.detach(), [None if x is None else x.grad.clone() for x in inputs]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("h0", [False, True], ids=["zero_state", "initial_state"])
def test_fast_scan_matches_the_sequential_reference_in_outputs_and_every_gradient(impl, shape, h0):
    seed = property_seed()
    gen = torch.Generator().manual_seed(seed)
    inputs = scan_inputs(*shape, h0=h0, gen=gen)
    w = torch.randn(shape[0], shape[1], shape[2], generator=gen)
    y_ref, g_ref = run_scan(inputs, "reference", w)
    y, g = run_scan(inputs, impl, w)
    assert rel(y, y_ref) < 1e-4, f"y, seed {seed}"
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]
    for name, got, want in zip(names, g, g_ref, strict=True):
        if want is None:
            assert got is None, f"{name}, seed {seed}"
            continue
        assert rel(got, want) < 1e-4, f"{name}, seed {seed}"


def test_auto_falls_back_to_the_pure_pytorch_scan_without_a_compiler(monkeypatch):
    monkeypatch.setattr(scan_mod, "load_kernel", lambda: None)
    assert scan_mod.resolve_impl("auto") == "torch"


def test_kernel_builds_into_the_cache_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MPS_KERNEL_CACHE", str(tmp_path))
    first = scan_mod.build_kernel()
    mtime = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.suffix == ".so"
    assert scan_mod.build_kernel() == first and first.stat().st_mtime_ns == mtime


def test_missing_compiler_is_reported_not_raised_at_import(tmp_path, monkeypatch):
    monkeypatch.setenv("MPS_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises((RuntimeError, OSError)):
        scan_mod.build_kernel()


# --- the mixer ----------------------------------------------------------------------------------------


def tiny_config(**kw) -> MambaConfig:
    base = dict(vocab_size=40, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2)
    base.update(kw)
    return MambaConfig(**base)


def twin_models(config: MambaConfig, impl: str):
    torch.manual_seed(0)
    ref = use_scan(MambaForCausalLM(config), "hf_loop")
    fast = MambaForCausalLM(config)
    fast.load_state_dict(ref.state_dict())
    return ref, use_scan(fast, impl)


@pytest.mark.parametrize("impl", FAST)
def test_project_mixer_matches_transformers_outputs_and_parameter_gradients(impl):
    ref, fast = twin_models(tiny_config(), impl)
    ids = torch.randint(0, 40, (3, 23))
    ref(ids, labels=ids).loss.backward()
    fast(ids, labels=ids).loss.backward()
    assert rel(fast(ids).logits.detach(), ref(ids).logits.detach()) < 1e-4
    grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert rel(p.grad, grads[name].grad) < 1e-4, name


@pytest.mark.parametrize("impl", FAST)
def test_padding_never_reaches_real_positions_and_matches_transformers_masking(impl):
    ref, fast = twin_models(tiny_config(), impl)
    ids = torch.randint(0, 40, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = fast(ids, attention_mask=mask).logits
        want = ref(ids, attention_mask=mask).logits
        alone = fast(ids[1:, :7]).logits
    assert rel(out, want) < 1e-4
    assert rel(out[1, :7], alone[0]) < 1e-4


@pytest.mark.parametrize("impl", FAST)
def test_extra_state_dimensions_match_a_model_built_with_the_larger_state(impl):
    """Additional-scan enlarges A_log to [E, N + n] and x_proj to R + 2(N + n) rows; the mixer must read the
    state size from A_log. A model configured with state N + n and the same weights is the reference."""
    ref, _ = twin_models(tiny_config(state_size=6), "hf_loop")
    small = use_scan(MambaForCausalLM(tiny_config(state_size=4)), impl)
    for big_layer, layer in zip(ref.backbone.layers, small.backbone.layers, strict=True):
        m, big = layer.mixer, big_layer.mixer
        m.A_log = torch.nn.Parameter(big.A_log.detach().clone())  # [E, 6]
        m.x_proj = torch.nn.Linear(m.x_proj.in_features, big.x_proj.out_features, bias=False)
        m.x_proj.weight.data.copy_(big.x_proj.weight)
    sd = {k: v for k, v in ref.state_dict().items() if "A_log" not in k and "x_proj" not in k}
    small.load_state_dict(sd, strict=False)
    ids = torch.randint(0, 40, (2, 17))
    with torch.no_grad():
        assert rel(small(ids).logits, ref(ids).logits) < 1e-4


@pytest.mark.parametrize("impl", FAST)
def test_initial_state_hook_is_identity_at_zero_and_trainable(impl):
    torch.manual_seed(0)
    lm = use_scan(MambaForCausalLM(tiny_config()), impl)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        before = lm(ids).logits
    states = []
    for layer in lm.backbone.layers:
        layer.mixer.initial_state = torch.nn.Parameter(torch.zeros(32, 4))
        states.append(layer.mixer.initial_state)
    with torch.no_grad():
        assert rel(lm(ids).logits, before) < 1e-6
        for s in states:
            s.normal_()
    out = lm(ids).logits
    assert rel(out.detach(), before) > 1e-3
    out.square().mean().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in states)


@pytest.mark.parametrize("impl", FAST)
def test_affix_tokens_are_prepended_before_the_convolution_and_dropped_after(impl):
    torch.manual_seed(0)
    lm = use_scan(MambaForCausalLM(tiny_config()), impl)
    ids = torch.randint(0, 40, (2, 9))
    tokens = []
    for layer in lm.backbone.layers:
        layer.mixer.affix_tokens = torch.nn.Parameter(torch.randn(3, 32))  # [n, E]: the x half only
        tokens.append(layer.mixer.affix_tokens)
    out = lm(ids).logits
    assert out.shape == (2, 9, 40)
    out.square().mean().backward()
    for t in tokens:
        assert (t.grad.abs().sum(0) > 0).all()  # every channel of the x half drives the kept positions
    for layer in lm.backbone.layers:
        layer.mixer.affix_tokens = None
    with torch.no_grad():
        assert rel(lm(ids).logits, out.detach()) > 1e-4


@pytest.mark.parametrize("impl", FAST)
def test_generation_with_a_cache_still_works(impl):
    ref, fast = twin_models(tiny_config(), impl)
    ids = torch.randint(0, 40, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        got, want = fast.generate(ids, **kw), ref.generate(ids, **kw)
    assert rel(torch.stack(got.logits), torch.stack(want.logits)) < 1e-4


def test_installing_on_a_model_without_mamba_mixers_is_an_error():
    with pytest.raises(ValueError, match="no MambaMixer"):
        install_fast_mixer(torch.nn.Linear(2, 2))


def test_every_supported_path_is_exercised_by_the_method_matrix():
    assert set(FAST) <= set(SCAN_PATHS)
    lm = use_scan(MambaForCausalLM(tiny_config()), "compiled")
    assert all(isinstance(layer.mixer, FastMambaMixer) for layer in lm.backbone.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_uses_the_effective_weights():
    from space.methods import LoraConfig
    from trials.methods import apply_methods

    torch.manual_seed(0)
    cpu = use_scan(MambaForCausalLM(tiny_config(hidden_size=64)), "torch")
    applied = apply_methods(cpu, {"lora_in_proj": LoraConfig(rank=4)})
    with torch.no_grad():
        for p in applied.params["lora_in_proj"]:
            p.add_(0.1)
    ids = torch.randint(0, 40, (2, 32))
    with torch.no_grad():
        want = cpu(ids).logits
        got = cpu.cuda()(ids.cuda()).logits.cpu()
    assert rel(got, want) < 1e-3


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "linear"])
def test_causal_conv_matches_torch_conv1d_on_a_strided_view(impl, silu):
    from trials.models.scan import causal_conv

    seed = property_seed()
    gen = torch.Generator().manual_seed(seed)
    bt, length, e, k = 3, 21, 10, 4
    xz = torch.randn(bt, length, 2 * e, generator=gen, requires_grad=True)  # x is the strided first half
    torch.manual_seed(seed)  # the convolution's initial weights come from the same seed
    conv = torch.nn.Conv1d(e, e, k, groups=e, padding=k - 1)
    out = causal_conv(xz[..., :e], conv.weight, conv.bias, silu=silu, impl=impl)
    want = conv(xz[..., :e].transpose(1, 2))[..., :length].transpose(1, 2)
    want = torch.nn.functional.silu(want) if silu else want
    w = torch.randn(bt, length, e, generator=gen)
    got_grads = torch.autograd.grad((out * w).sum(), [xz, conv.weight, conv.bias])
    want_grads = torch.autograd.grad((want * w).sum(), [xz, conv.weight, conv.bias])
    assert rel(out.detach(), want.detach()) < 1e-4, f"output, seed {seed}"
    for name, got, ref in zip(["x", "weight", "bias"], got_grads, want_grads, strict=True):
        assert rel(got, ref) < 1e-4, f"{name}, seed {seed}"
