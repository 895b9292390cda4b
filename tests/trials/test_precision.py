"""Mixed-precision trials: bf16/fp16 autocast around fp32 master weights, fp16 loss scaling, and a selective
scan that stays fp32 under autocast on every execution path."""

from __future__ import annotations

import math

import pytest
import torch

from space.config import TrialConfig
from tests.conftest import small_trial_yaml
from trials.models import scan as scan_mod
from trials.models.scan import causal_conv, selective_scan_tokens
from trials.run import build_trial, run_trial

FAST = ("compiled", "torch")
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def precision_trial(precision: str, steps: int = 4, eval_every: int = 2) -> TrialConfig:
    text = small_trial_yaml(steps=steps, eval_every=eval_every)
    return TrialConfig.from_yaml(text.replace("grad_clip: 1.0}", f"grad_clip: 1.0, precision: {precision}}}"))


class SpyScaler(torch.amp.GradScaler):
    """The GradScaler run_trial creates, recorded so a test can read its scale and count its steps."""

    instances: list[SpyScaler] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0
        SpyScaler.instances.append(self)

    def step(self, optimizer, *args, **kwargs):
        self.steps += 1
        return super().step(optimizer, *args, **kwargs)


@pytest.fixture
def spy_scaler(monkeypatch):
    SpyScaler.instances = []
    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    return SpyScaler


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_trial_autocasts_the_forward_and_keeps_fp32_master_weights(precision, spy_scaler):
    cfg = precision_trial(precision)
    built = build_trial(cfg)
    seen: set[tuple[bool, torch.dtype]] = set()  # (training, in_proj output dtype)
    in_proj = built.model.backbone.layers[0].mixer.in_proj
    in_proj.register_forward_hook(lambda mod, args, out: seen.add((mod.training, out.dtype)))
    before = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    result = run_trial(cfg, built=built)
    assert all(math.isfinite(point["train_loss"]) for point in result.curve)
    assert seen == {(True, LOW[precision]), (False, LOW[precision])}  # training and evaluation forwards
    assert {p.dtype for p in built.model.parameters()} == {torch.float32}
    params = dict(built.model.named_parameters())
    assert all(not params[n].equal(v) for n, v in before.items())  # the optimiser stepped
    assert len(spy_scaler.instances) == (1 if precision == "fp16" else 0)  # only fp16 scales the loss


def test_fp16_trial_skips_the_step_whose_gradient_overflowed_and_halves_the_scale(spy_scaler):
    cfg = precision_trial("fp16", steps=1, eval_every=1)
    built = build_trial(cfg)
    built.model.head.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    before = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    run_trial(cfg, built=built)
    (scaler,) = spy_scaler.instances
    assert scaler.steps == 1 and scaler.get_scale() == 2.0**16 * scaler.get_backoff_factor()
    params = dict(built.model.named_parameters())
    assert all(params[n].equal(v) for n, v in before.items())  # unscaled inf -> no update, no NaN weights


def test_fp16_trial_clips_the_unscaled_gradients(monkeypatch):
    norms: dict[str, float] = {}
    clip = torch.nn.utils.clip_grad_norm_
    for precision in ("fp32", "fp16"):
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, p=precision: (
            norms.__setitem__(p, float(clip(params, max_norm))), norms[p])[1])
        run_trial(precision_trial(precision, steps=1, eval_every=1))
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)  # not 2**16 times it


def scan_inputs(gen: torch.Generator, low: torch.dtype, bt: int = 2, length: int = 19, e: int = 8, n: int = 4):
    """What the mixer hands the scan under autocast: conv output x in fp32, projections (dt, B, C, z) in the
    autocast dtype, and the fp32 SSM parameters A, D and the dt bias."""
    def leaf(*shape, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_()

    a = (-(torch.rand(e, n, generator=gen) * 2 + 0.05)).requires_grad_()
    return [leaf(bt, length, e), leaf(bt, length, e, dtype=low, scale=0.5), a, leaf(bt, length, n, dtype=low),
            leaf(bt, length, n, dtype=low), leaf(e), leaf(bt, length, e, dtype=low), leaf(e, scale=0.5)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("impl", FAST)
def test_scan_computes_in_fp32_under_autocast(impl, precision, monkeypatch):
    calls: list[set[torch.dtype]] = []
    compiled = scan_mod._CompiledScan.apply
    monkeypatch.setattr(scan_mod._CompiledScan, "apply", lambda *args: (
        calls.append({t.dtype for t in args if isinstance(t, torch.Tensor)}), compiled(*args))[1])
    inputs = scan_inputs(torch.Generator().manual_seed(0), LOW[precision])
    x, dt, a, b, c, d, z, bias = inputs
    with torch.autocast("cpu", dtype=LOW[precision]):
        y = selective_scan_tokens(x, dt, a, b, c, D=d, z=z, delta_bias=bias, impl=impl)
    # The same (already rounded) inputs, upcast, through the fp32 sequential loop with autocast off.
    want = selective_scan_tokens(*[t.detach().float() for t in inputs[:5]], D=d.detach(), z=z.detach().float(),
                                 delta_bias=bias.detach(), impl="reference")
    assert y.dtype == torch.float32
    assert rel(y.detach(), want) < 1e-4  # a bf16/fp16 scan would be off by ~1e-2
    assert calls == ([{torch.float32}] if impl == "compiled" else [])
    y.square().sum().backward()
    for t in inputs:
        assert t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("impl", FAST)
def test_causal_conv_computes_in_fp32_under_autocast_and_returns_fp32(impl, monkeypatch):
    calls: list[torch.dtype] = []
    compiled = scan_mod._CompiledConv.apply
    monkeypatch.setattr(scan_mod._CompiledConv, "apply", lambda *args: (calls.append(args[0].dtype),
                                                                         compiled(*args))[1])
    gen = torch.Generator().manual_seed(1)
    bt, length, e, k = 2, 17, 8, 4
    xz = torch.randn(bt, length, 2 * e, generator=gen).bfloat16().requires_grad_()  # in_proj's bf16 output
    conv = torch.nn.Conv1d(e, e, k, groups=e, padding=k - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_conv(xz[..., :e], conv.weight, conv.bias, impl=impl)
    want = torch.nn.functional.silu(conv(xz[..., :e].detach().float().transpose(1, 2))[..., :length]).transpose(1, 2)
    assert out.dtype == torch.float32
    assert rel(out.detach(), want.detach()) < 1e-5
    assert calls == ([torch.float32] if impl == "compiled" else [])  # the kernel is used, on fp32
    out.sum().backward()
    assert xz.grad is not None and xz.grad.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_scan_path_trains_under_autocast_close_to_fp32_with_fp32_ssm_parameters(tiny_lm, tiny_ids, precision):
    want = tiny_lm(tiny_ids).logits.detach()
    with torch.autocast("cpu", dtype=LOW[precision]):
        logits = tiny_lm(tiny_ids).logits
    logits.float().logsumexp(-1).sum().backward()
    assert rel(logits.detach(), want) < 0.05
    for layer in tiny_lm.backbone.layers:
        mixer = layer.mixer
        for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias):
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_on_cuda_autocast_logits_stay_within_the_stated_tolerance_of_fp32(precision):
    """On CUDA under bf16 / fp16 autocast, the path a Mamba-1 takes (mamba-ssm's fused kernel where it can run: it
    casts x_proj, dt_proj and out_proj to the autocast dtype and keeps the scan state fp32; else the torch path)
    gives logits within 5e-2 of fp32's largest logit (bf16 keeps 8 bits of mantissa, fp16 11)."""
    from trials.models import fused
    from trials.models.fixtures import tiny_model
    from trials.models.loading import use_scan

    lm = use_scan(tiny_model("mamba"), "auto").cuda()
    ids = torch.randint(3, 200, (4, 48), generator=torch.Generator().manual_seed(0)).cuda()
    want = lm(ids, use_cache=False).logits.float()
    fused.reset()
    with torch.autocast("cuda", dtype=LOW[precision]):
        got = lm(ids, use_cache=False).logits
    assert rel(got, want) < 5e-2, fused.kernel_label()
