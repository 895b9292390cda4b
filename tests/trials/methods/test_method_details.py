"""Behaviour specific to single methods, beyond the shared matrix in test_methods.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MambaConfig, MambaForCausalLM

from space.methods import (
    AdditionalScanConfig,
    AffixConfig,
    DeltaConfig,
    InitialStateConfig,
    LoraConfig,
    ProdialConfig,
    PromptConfig,
    ZeroDecayConfig,
)
from tests.trials.methods.test_methods import on_transformers_path
from trials.methods import REGISTRY, MethodError, apply_methods, merge_methods
from trials.models.loading import use_scan
from trials.models.mamba1 import dims as mamba1_dims
from trials.models.scan import _reference_scan


def forward(lm, ids, **kw):
    return lm(ids, use_cache=False, **kw).logits


def test_closed_forms_reproduce_the_reference_counts_of_the_new_methods():
    # peft-methods.md, Vim-S (D=384, E=768, 24 layers, two scan directions): Additional-scan n=6 gives 664K.
    vim = mamba1_dims(D=384, E=768, N=16, R=24, K=4, L=24, V=1)
    assert 2 * REGISTRY["additional_scan"].count(AdditionalScanConfig(states=6), vim) == 663_552
    # Affix w/o projection, 3 dual tokens: MambaPEFT counts 2E per token (221K); the z half of a dropped position
    # can never get a gradient, so only the x half is learned here: exactly half.
    assert 2 * REGISTRY["affix_tuning"].count(AffixConfig(tokens=3), vim) == 221_184 // 2
    # ProDiaL: D^2/r_b1 + 2E + r(D+2E) on in_proj and E^2/r_b2 + D + r(E+D) on out_proj, mamba-130m, 64 blocks
    # each (block sizes 12 and 24), r = 8.
    m130 = mamba1_dims(D=768, E=1536, N=16, R=48, K=4, L=1, V=50280)
    assert REGISTRY["prodial_in_proj"].count(ProdialConfig(block_size=12, rank=8), m130) == (
        768**2 // 64 + 2 * 1536 + 8 * (768 + 2 * 1536))
    assert REGISTRY["prodial_out_proj"].count(ProdialConfig(block_size=24, rank=8), m130) == (
        1536**2 // 64 + 768 + 8 * (1536 + 768))
    # Halloran-style ("SLL") LoRA r64 on Mamba-1.4B: about 66.8M.
    m14b = mamba1_dims(D=2048, E=4096, N=16, R=128, K=4, L=48, V=50280)
    assert REGISTRY["lora_halloran"].count(LoraConfig(rank=64), m14b) == 66_755_072
    # Initial state E N, with the conv state + E (K-1); state offset E N; prompt n D; norms (L + 1) D; BitFit 2E.
    assert REGISTRY["initial_state"].count(InitialStateConfig(conv_state=True), m130) == 1536 * 16 + 1536 * 3
    assert REGISTRY["prompt_tuning"].count(PromptConfig(tokens=8, position="prefix_suffix"), m130) == 16 * 768
    assert REGISTRY["prompt_tuning"].count(PromptConfig(tokens=1, projection=True), m130) == (
        768 + 2 * 768**2 + 2 * 768)
    assert REGISTRY["norm_delta"].count(DeltaConfig(), m130) == 2 * 768
    assert REGISTRY["bitfit"].count(DeltaConfig(), m130) == 2 * 1536


def test_prodial_diagonal_gets_a_gradient_at_init(tiny_lm, tiny_ids):
    """Pitfall P10: the reference's 1 - ReLU(diag R) at R = 0 never learns; ours must, from the first step."""
    applied = apply_methods(tiny_lm, {"prodial_in_proj": ProdialConfig(block_size=8, rank=2)})
    tiny_lm.train()
    forward(tiny_lm, tiny_ids).square().mean().backward()
    blocks = applied.params["prodial_in_proj"][0]  # [b, k, k] of layer 0
    assert blocks.grad is not None
    assert (torch.diagonal(blocks.grad, dim1=1, dim2=2).abs() > 0).all()


def test_prodial_block_size_must_divide_the_input(tiny_lm):
    with pytest.raises(MethodError, match=r"prodial_in_proj.block_size 5 does not divide the input size 32"):
        apply_methods(tiny_lm, {"prodial_in_proj": ProdialConfig(block_size=5, rank=2)})


def test_embedding_lora_moves_the_tied_lm_head_with_it(tiny_lm):
    assert tiny_lm.lm_head.weight is tiny_lm.backbone.embeddings.weight
    applied = apply_methods(tiny_lm, {"lora_embeddings": LoraConfig(rank=2)})
    with torch.no_grad():
        for p in applied.params["lora_embeddings"]:
            p.add_(0.1)
    original = tiny_lm.backbone.embeddings.parametrizations.weight.original
    assert not torch.allclose(tiny_lm.backbone.embeddings.weight, original, atol=1e-4)
    assert torch.allclose(tiny_lm.lm_head.weight, tiny_lm.backbone.embeddings.weight, rtol=1e-6, atol=1e-7)
    merge_methods(tiny_lm)
    assert tiny_lm.lm_head.weight is tiny_lm.backbone.embeddings.weight


def test_lora_alpha_sets_the_scale_to_alpha_over_rank(tiny_lm):
    assert LoraConfig(rank=4, alpha=8.0, scale=0.1).effective_scale == 2.0
    assert LoraConfig(rank=4, scale=0.1).effective_scale == 0.1
    apply_methods(tiny_lm, {"lora_out_proj": LoraConfig(rank=4, alpha=8.0)})
    assert tiny_lm.backbone.layers[0].mixer.out_proj.parametrizations.weight[0].scale == 2.0


def test_lora_dropout_drops_the_adapter_input_in_training_only(tiny_lm, tiny_ids):
    applied = apply_methods(tiny_lm, {"lora_in_proj": LoraConfig(rank=2, dropout=0.5)})
    with torch.no_grad():
        for p in applied.params["lora_in_proj"]:
            p.add_(0.2)
        evaluated = forward(tiny_lm.eval(), tiny_ids)
        assert torch.allclose(forward(tiny_lm, tiny_ids), evaluated, rtol=1e-5, atol=1e-6)  # no dropout in eval
        tiny_lm.train()
        torch.manual_seed(1)
        first = forward(tiny_lm, tiny_ids)
        second = forward(tiny_lm, tiny_ids)
    assert not torch.allclose(first, evaluated, atol=1e-5)
    assert not torch.allclose(first, second, atol=1e-5)


def test_lora_dropout_equals_the_adapter_on_the_dropped_input():
    """out = W x + s B A drop(x), checked on one in_proj with a fixed dropout mask."""
    from trials.methods.lora import add_lora

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 8, bias=False)
    delta = add_lora(linear, LoraConfig(rank=2, scale=0.5, dropout=0.5))
    with torch.no_grad():
        delta.lora_B.normal_()
    x = torch.randn(3, 6)
    torch.manual_seed(5)
    out = linear(x)
    torch.manual_seed(5)
    dropped = torch.nn.functional.dropout(x, 0.5)
    want = x @ linear.parametrizations.weight.original.T + 0.5 * dropped @ delta.lora_A.T @ delta.lora_B.T
    assert torch.allclose(out, want, atol=1e-6)


@pytest.mark.parametrize(("name", "cfg", "message"), [
    ("lora_dt_proj", LoraConfig(rank=2, dropout=0.1), "dt_proj is not called as a module on every path"),
    ("lora_embeddings", LoraConfig(rank=2, dropout=0.1), "embeddings is not called as a module on every path"),
    ("lora_in_proj", LoraConfig(rank=2, dropout=0.1, dora=True), "dropout with dora is not supported"),
])
def test_unsupported_lora_dropout_is_refused_naming_the_method(tiny_lm, name, cfg, message):
    with pytest.raises(MethodError, match=rf"{name}.dropout 0.1: .*{message}"):
        apply_methods(tiny_lm, {name: cfg})


def test_bitfit_creates_a_missing_conv_bias_and_the_merged_checkpoint_keeps_it(tmp_path, tiny_ids):
    torch.manual_seed(0)
    lm = use_scan(MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=32, state_size=4, num_hidden_layers=2,
                                               use_conv_bias=False)), "compiled").eval()
    assert lm.backbone.layers[0].mixer.conv1d.bias is None
    applied = apply_methods(lm, {"bitfit": DeltaConfig()})
    with torch.no_grad():
        for p in applied.params["bitfit"]:
            p.add_(0.1)
        adapted = forward(lm, tiny_ids)
    merge_methods(lm)
    lm.save_pretrained(tmp_path)
    plain = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.use_conv_bias
    with torch.no_grad():
        assert torch.allclose(forward(plain, tiny_ids), adapted, atol=1e-5)


def _perturbed(lm, methods):
    applied = apply_methods(lm, methods)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ps in applied.params.values():
            for p in ps:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return lm.eval()


@pytest.mark.parametrize("position", ["prefix", "suffix", "prefix_suffix"])
def test_prompt_outputs_do_not_depend_on_right_or_left_padding(tiny_lm, position):
    lm = _perturbed(tiny_lm, {"prompt_tuning": PromptConfig(tokens=2, position=position)})
    ids = torch.randint(3, 40, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = forward(lm, ids)[0]  # [7, V]
        right = forward(lm, torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                        attention_mask=torch.tensor([[1] * 7 + [0] * 3]))[0, :7]
        left = forward(lm, torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
                       attention_mask=torch.tensor([[0] * 3 + [1] * 7]))[0, 3:]
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)


def test_a_suffix_prompt_acts_on_the_last_real_position_only(tiny_lm, tiny_ids):
    with torch.no_grad():
        base = forward(tiny_lm, tiny_ids)
    lm = _perturbed(tiny_lm, {"prompt_tuning": PromptConfig(tokens=2, position="suffix")})
    with torch.no_grad():
        got = forward(lm, tiny_ids)
    assert torch.allclose(got[:, :-1], base[:, :-1], atol=1e-5)  # causal: nothing before the suffix sees it
    assert not torch.allclose(got[:, -1], base[:, -1], atol=1e-4)


def test_classifier_reads_the_suffix_after_each_examples_last_real_token():
    from trials.tasks.types.classification import SequenceClassifier

    torch.manual_seed(0)
    lm = use_scan(MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=32, state_size=4, num_hidden_layers=2)),
                  "compiled")
    model = SequenceClassifier(_perturbed(lm, {"prompt_tuning": PromptConfig(tokens=2, position="suffix")}), 3)
    ids = torch.randint(3, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        batched = model(ids, torch.tensor([9, 5]))
        short = model(ids[1:, :5], torch.tensor([5]))
    assert torch.allclose(batched[1], short[0], atol=1e-5)


def _greedy(lm, ids, steps, use_cache):
    return lm.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=use_cache, pad_token_id=0)


def _greedy_logits(lm, ids, steps, use_cache):
    """The logits of each greedy step, [steps, B, V] (cached decoding is compared on these in
    test_generation_cache.py)."""
    out = lm.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=use_cache, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits)


def test_merged_additional_scan_model_has_the_enlarged_state_and_generates(tiny_lm, tiny_ids, tmp_path):
    lm = _perturbed(tiny_lm, {"additional_scan": AdditionalScanConfig(states=3)})
    with torch.no_grad():
        want = _greedy_logits(lm, tiny_ids, 3, use_cache=False)
    merge_methods(lm)
    lm.save_pretrained(tmp_path)
    plain = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert plain.config.state_size == 7
    assert plain.backbone.layers[0].mixer.A_log.shape == (64, 7)
    with torch.no_grad():
        got = _greedy_logits(plain, tiny_ids, 3, use_cache=True)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_additional_scan_copies_the_last_a_column(tiny_lm):
    a_log = tiny_lm.backbone.layers[0].mixer.A_log.detach().clone()
    apply_methods(tiny_lm, {"additional_scan": AdditionalScanConfig(states=2)})
    grown = tiny_lm.backbone.layers[0].mixer.A_log
    assert grown.shape == (64, 6)
    assert torch.equal(grown[:, :4], a_log) and torch.equal(grown[:, 4], a_log[:, -1])  # copies, not arithmetic


@pytest.mark.parametrize("methods", [
    {"affix_tuning": AffixConfig(tokens=2)}, {"initial_state": InitialStateConfig()},
    {"state_offset": ZeroDecayConfig()},
], ids=["affix", "initial_state", "state_offset"])
def test_state_hooks_run_in_an_eval_forward_but_refuse_to_decode_from_a_cache(tiny_lm, tiny_ids, methods):
    if on_transformers_path(tiny_lm):
        pytest.skip("refused on transformers' paths (test_methods)")
    lm = _perturbed(tiny_lm, methods)
    with torch.no_grad():
        assert torch.allclose(lm(tiny_ids).logits, forward(lm, tiny_ids))  # eval forward, cache on by default
        _greedy(lm, tiny_ids, 2, use_cache=False)
        with pytest.raises(RuntimeError, match="cannot decode from a generation cache.*use_cache=False"):
            _greedy(lm, tiny_ids, 2, use_cache=True)


def test_affix_tokens_learn_only_the_x_half(tiny_lm, tiny_ids):
    if on_transformers_path(tiny_lm):
        pytest.skip("refused on transformers' paths (test_methods)")
    applied = apply_methods(tiny_lm, {"affix_tuning": AffixConfig(tokens=3)})
    assert [tuple(p.shape) for p in applied.params["affix_tuning"]] == [(3, 64), (3, 64)]  # [n, E] per layer


def reference_mixer(mixer, hidden_states: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Mamba-1's mixer written out (no mask, no cache) around ``trials.models.scan``'s sequential reference scan,
    started from ``h0`` [E, N]."""
    bt, length, _ = hidden_states.shape
    x, z = mixer.in_proj(hidden_states).chunk(2, dim=-1)  # [Bt, L, E] each
    x = F.silu(mixer.conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)  # causal depthwise conv, [Bt, L, E]
    n = mixer.A_log.shape[1]
    dt, b, c = torch.split(mixer.x_proj(x), [mixer.time_step_rank, n, n], dim=-1)  # [Bt, L, R], [Bt, L, N] x2
    dt = F.softplus(mixer.dt_proj(dt))  # with dt_proj's bias, [Bt, L, E]
    a = -torch.exp(mixer.A_log)  # [E, N]
    y = _reference_scan(x, dt, a, b, c, h0.expand(bt, -1, -1))  # [Bt, L, E]
    y = (y + x * mixer.D) * F.silu(z)  # [Bt, L, E]
    return mixer.out_proj(y)  # [Bt, L, D]


def test_initial_state_is_the_scan_start(tiny_lm, tiny_ids):
    """A learned h0 equals the torch reference scan started from h0."""
    if on_transformers_path(tiny_lm):
        pytest.skip("refused on transformers' paths (test_methods)")
    with torch.no_grad():
        before = forward(tiny_lm, tiny_ids)
    lm = _perturbed(tiny_lm, {"initial_state": InitialStateConfig()})  # every layer's h0 [E, N] moved off zero
    with torch.no_grad():
        got = forward(lm, tiny_ids)
        for layer in lm.backbone.layers:  # the same model with each mixer written out around the reference scan
            layer.mixer.forward = lambda hs, *_, m=layer.mixer, **__: reference_mixer(m, hs, m.initial_state)
        want = forward(lm, tiny_ids)
    assert (want - before).abs().amax() > 1e-2  # h0 moves the outputs, so the comparison below can fail
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fp32: the scans differ only in summation order


@pytest.mark.parametrize(("model_type", "block"), [("mamba", "z"), ("mamba2", "b"), ("mamba2", "dt")])
def test_prodial_on_a_block_transforms_that_block_s_rows_only_as_prodial_on_those_rows_would(model_type, block):
    from space.methods import method_config
    from trials.methods.prodial import ProdialTransform
    from trials.models.fixtures import tiny_model
    from trials.models.interface import mixer_kinds

    lm = tiny_model(model_type, seed=0)
    name = f"prodial_in_proj_{block}"
    cfg = method_config(name, {"block_size": 4, "rank": 2})
    (first, *_) = mixer_kinds(lm)
    rows = first.spec.projection("in_proj").block(block)
    pretrained = first.projection("in_proj").weight.detach().clone()  # [out, in]
    applied = apply_methods(lm, {name: cfg})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in applied.params[name]:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
        transform = first.projection("in_proj").parametrizations["weight"][0].inner
        assert isinstance(transform, ProdialTransform)
        effective = first.projection("in_proj").weight  # [out, in]
    outside = torch.ones(pretrained.shape[0], dtype=torch.bool)
    outside[rows.start:rows.stop] = False
    torch.testing.assert_close(effective[outside], pretrained[outside], rtol=0, atol=0)
    torch.testing.assert_close(effective[rows.start:rows.stop], transform(pretrained[rows.start:rows.stop]))
    assert not torch.allclose(effective[rows.start:rows.stop], pretrained[rows.start:rows.stop])
