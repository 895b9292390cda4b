"""SDT on Mamba-2: heads and their channels selected from the warm-up, the sparse deltas on A_log and in_proj's x
rows, and a trial on the embedded Mamba-2 that runs the warm-up (the method matrix in test_methods_mamba2.py
checks counts, gradients, merging and adapters on every Mamba-2 architecture)."""

from __future__ import annotations

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from space.config import TrialConfig
from space.methods import LoraConfig, SdtConfig, SdtLayer
from tests.conftest import small_trial_yaml
from trials.methods import REGISTRY, MethodError, ModelDims, apply_methods, count_params, supported
from trials.methods.sdt import SparseDelta, checkpoint_dims, kept_heads, select_heads
from trials.models.mamba2 import spec

# Tiny Mamba-2: D=32, 2 layers, H=8 heads of P=8 channels (I=64), G=2 groups, N=4. freeze 0.75 / 0.5 keep
# c = 8 - 6 = 2 heads and s = 8 - 4 = 4 channels per head.
D, H, P, N, G = 32, 8, 8, 4, 2
I = H * P  # noqa: E741 (the notation)
TINY = SdtConfig(freeze_channel=0.75, freeze_state=0.5)
C, S = 2, 4


def tiny_mamba2() -> Mamba2ForCausalLM:
    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=40, hidden_size=D, num_hidden_layers=2, num_heads=H, head_dim=P, n_groups=G,
                          state_size=N, chunk_size=8, expand=2, initializer_range=0.25)
    return Mamba2ForCausalLM(config).eval()


def tiny_config() -> SdtConfig:
    gen = torch.Generator().manual_seed(3)
    a_log = [torch.randn(H, generator=gen) for _ in range(2)]
    conv = [torch.randn(I + 2 * G * N, 1, 4, generator=gen) for _ in range(2)]
    return TINY.model_copy(update={"selection": tuple(select_heads(a_log, conv, P, TINY))})


@pytest.fixture
def ids():
    return torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(lm, ids):
    with torch.no_grad():
        return lm(ids).logits


def test_selection_keeps_the_heads_with_the_largest_a_delta_and_their_channels_with_the_largest_conv_delta():
    cfg = SdtConfig(freeze_channel=0.5, freeze_state=0.5)  # H=4 -> 2 heads, P=4 -> 2 channels
    a_log = torch.tensor([0.1, -3.0, 0.2, 3.0])  # heads 1 and 3 (same magnitude; both kept)
    conv = torch.zeros(4 * 4 + 6, 1, 2)  # x channels (h P + p) first, then B and C: never scored
    conv[4 + 2] = torch.tensor([[1.0, 1.0]])  # head 1 channel 2: 2
    conv[4 + 0] = torch.tensor([[0.0, -1.5]])  # head 1 channel 0: 2.25, the top one
    conv[12 + 3] = torch.tensor([[0.5, 0.0]])  # head 3 channel 3: 0.25; channels 0..2 tie at 0 -> the lowest
    conv[16:] = 100.0  # B / C channels: larger, but not x channels
    (layer,) = select_heads([a_log], [conv], 4, cfg)
    assert layer == SdtLayer(channels=(1, 3), states=((0, 2), (0, 3)))


def test_at_least_one_head_is_kept_and_a_fraction_keeping_no_channel_is_refused():
    assert kept_heads(SdtConfig(), heads=24, head_dim=64) == (1, 16)  # 0.99 of 24 heads rounds to all 24
    with pytest.raises(MethodError, match=r"keeps 0 of a head's P=8 channels"):
        kept_heads(SdtConfig(freeze_state=0.95), heads=8, head_dim=8)


def test_closed_form_count_on_mamba2_130m():
    # mamba2-130m: D=768, I=1536 (24 heads of 64), N=128, G=1; one head and 16 of its channels per layer:
    # 1 A_log entry + 16 in_proj rows of 768.
    dims = ModelDims(model_type="mamba2", mixer=spec(768, 1536, 128, 4, 24, 64, 1), L=24, V=50288, norms=25)
    assert REGISTRY["sdt"].count(SdtConfig(), dims) == 24 * (1 + 16 * 768)
    sdlora = {"sdt": SdtConfig(), "lora_out_proj": LoraConfig(rank=8)}
    assert sum(count_params(sdlora, dims).values()) == 24 * (1 + 16 * 768 + 8 * (1536 + 768))


def test_sdt_is_supported_on_every_mamba2_architecture():
    for model_type in ("mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"):
        assert supported("sdt", model_type) is None, model_type


def test_only_the_kept_heads_a_log_and_the_kept_channels_x_rows_change(ids):
    lm = tiny_mamba2()
    cfg = tiny_config()
    applied = apply_methods(lm, {"sdt": cfg})
    assert applied.num_params()["sdt"] == 2 * (C + C * S * D)
    with torch.no_grad():
        for p in applied.params["sdt"]:
            p.add_(0.05 * (torch.rand(p.shape, generator=torch.Generator().manual_seed(7)) + 0.5))
    for block, layer in zip(lm.backbone.layers, cfg.selection, strict=True):
        mixer = block.mixer
        a_changed = (mixer.A_log != mixer.parametrizations.A_log.original).detach()  # [H]
        expected = torch.zeros(H, dtype=torch.bool)
        expected[list(layer.channels)] = True
        assert torch.equal(a_changed, expected)
        w = mixer.in_proj
        changed = (w.weight != w.parametrizations.weight.original).detach()  # [2I + 2GN + H, D]
        expected = torch.zeros_like(changed)
        for h, channels in zip(layer.channels, layer.states, strict=True):
            expected[[I + h * P + p for p in channels]] = True  # the x block starts after z [I]
        assert torch.equal(changed, expected)


def test_identity_at_init_and_every_delta_reaches_the_output_through_the_project_mixer(ids):
    from trials.models.mamba2_mixer import install_fast_mamba2_mixer

    lm = tiny_mamba2()
    install_fast_mamba2_mixer(lm, "torch")
    before = logits(lm, ids)
    applied = apply_methods(lm, {"sdt": tiny_config()})
    torch.testing.assert_close(logits(lm, ids), before, rtol=1e-5, atol=1e-6)  # zero deltas, fp32
    for p in applied.params["sdt"]:
        with torch.no_grad():
            p.fill_(0.3)
        out = lm(ids).logits
        assert (out - before).abs().max() > 1e-4, f"a delta {tuple(p.shape)} does not reach the output"
        with torch.no_grad():
            p.zero_()
    lm(ids).logits.square().mean().backward()
    for p in applied.params["sdt"]:
        assert p.grad is not None and (p.grad != 0).all(), f"a delta {tuple(p.shape)} has a zero gradient entry"
    assert [type(m) for m in lm.backbone.layers[0].mixer.parametrizations.A_log] == [SparseDelta]


BAD = {
    "head range": (((0, 8), ((0, 1, 2, 3),) * 2), r"selection layer 0: head outside 0..7"),
    "channel range": (((0, 1), ((0, 1, 2, 3), (0, 1, 2, 8))), r"selection layer 0: head 1 has a channel outside 0..7"),
    "channel count": (((0, 1), ((0, 1, 2, 3), (0, 1, 2))), r"selection layer 0: head 1 has channels \[0, 1, 2\]"),
    "head count": (((0, 1, 2), ((0, 1, 2, 3),) * 3), r"selection layer 0: 3 heads, the config keeps 2"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_selection_that_does_not_fit_the_heads_is_refused_naming_head_and_channel(case):
    (heads, channels), message = BAD[case]
    bad = SdtLayer(channels=heads, states=channels)
    with pytest.raises(MethodError, match=message):
        apply_methods(tiny_mamba2(), {"sdt": TINY.model_copy(update={"selection": (bad, bad)})})


def test_checkpoint_dims_tells_the_kind_without_loading_weights():
    assert checkpoint_dims("embedded-mamba2").mixer.kind == "mamba2"
    assert checkpoint_dims("embedded").mixer.kind == "mamba1"


def test_a_trial_on_the_embedded_mamba2_runs_the_warm_up_on_heads_and_channels(monkeypatch):
    from trials.methods import sdt as sdt_module
    from trials.run import build_trial, expected_trainable, run_trial

    warm_methods = []
    real = sdt_module.select_heads
    monkeypatch.setattr("trials.methods.sdt.select_heads",
                        lambda a, conv, p, cfg: warm_methods.append((len(a), len(conv), p)) or real(a, conv, p, cfg))
    cfg = TrialConfig.from_yaml(small_trial_yaml(
        methods="sdt: {warmup_steps: 3, freeze_channel: 0.75}\n  lora_out_proj: {rank: 2}", steps=3,
        checkpoint="embedded-mamba2"))
    built = build_trial(cfg)
    # Embedded Mamba-2: 4 layers, D=64, H=8 heads of P=16. c = 8 - 6 = 2 heads, s = 16 - 12 = 4 channels.
    assert warm_methods == [(4, 4, 16)]  # the warm-up trained A_log and conv1d deltas on every layer
    resolved = built.applied.configs["sdt"]
    assert resolved.model_copy(update={"selection": None}) == cfg.methods["sdt"]
    assert len(resolved.selection) == 4
    assert all(len(layer.channels) == 2 and all(len(c) == 4 for c in layer.states) for layer in resolved.selection)
    assert built.applied.num_params()["sdt"] == 4 * (2 + 2 * 4 * 64)
    dims = ModelDims.from_config(built.model.lm.config)
    assert built.trainable_params == expected_trainable(cfg, dims, built.data.num_classes)
    result = run_trial(cfg, steps=3, built=built)
    assert result.method_params["sdt"] == 4 * (2 + 2 * 4 * 64)
    assert result.steps_done == 3 and 0.0 <= result.val_accuracy <= 1.0
