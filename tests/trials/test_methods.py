"""The method matrix: every method and every combination the registry allows goes through the same checks."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaForCausalLM

from space.methods import METHOD_SPACES, DeltaConfig, LoraConfig
from trials.methods import (
    REGISTRY,
    MethodError,
    ModelDims,
    apply_methods,
    count_params,
    load_adapters,
    merge_methods,
    save_adapters,
)

CONFIGS = {name: (LoraConfig(rank=2, scale=0.7) if name.startswith("lora_") else config_cls(rank=3, scale=0.5)
                 if name == "parallel_adapter" else config_cls())
           for name, (_, config_cls) in METHOD_SPACES.items()}
# DoRA as the variant of every LoRA target.
CONFIGS.update({f"{name}+dora": LoraConfig(rank=2, scale=0.7, dora=True) for name in METHOD_SPACES
                if name.startswith("lora_")})
# Every method alone, every method at once, and pairs that stack two parametrisations on one tensor.
PLAIN = [name for name in CONFIGS if "+" not in name]
COMBOS = ([(name,) for name in CONFIGS] + [tuple(PLAIN)]
          + [("lora_in_proj", "lora_in_proj_x"), ("lora_x_proj_b", "lora_x_proj_c"), ("a_log_delta", "lora_x_proj"),
             ("lora_in_proj_x+dora", "lora_in_proj_z")])


def methods_of(combo) -> dict:
    """``{"lora_out_proj+dora": cfg}`` -> ``{"lora_out_proj": cfg}``: the variant is in the config."""
    return {name.split("+")[0]: CONFIGS[name] for name in combo}


def ids(combo) -> str:
    return "all" if len(combo) == len(PLAIN) else "&".join(combo)


def perturb(applied) -> None:
    """Move every method tensor off its init so no gradient is zero by construction (LoRA's B = 0)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for ps in applied.params.values():
            for p in ps:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_every_registered_method_has_a_search_space_and_vice_versa():
    assert set(REGISTRY) == set(METHOD_SPACES) == set(PLAIN)


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_measured_count_equals_closed_form_and_combined_count_is_the_sum(tiny_lm, combo):
    methods = methods_of(combo)
    applied = apply_methods(tiny_lm, methods)
    trainable = sum(p.numel() for p in tiny_lm.parameters() if p.requires_grad)
    formula = count_params(methods, ModelDims.from_config(tiny_lm.config))
    assert trainable == sum(formula.values())
    assert applied.num_params() == formula


def test_closed_forms_reproduce_the_reference_per_layer_counts():
    # peft-methods.md: LoRA(in_proj) r32 on Vim-S (D=384, E=768): r(D+2E) = 61,440 per layer, 1,475K over 24;
    # A-tuning: E*N = 12,288 per layer per scan direction (x2 on Vim, x24 layers = 589,824, +9K head = 598K).
    vim = ModelDims(D=384, E=768, N=16, R=24, K=4, L=1, V=1)
    assert REGISTRY["lora_in_proj"].count(LoraConfig(rank=32), vim) == 61_440
    assert REGISTRY["lora_in_proj"].count(LoraConfig(rank=32), ModelDims(384, 768, 16, 24, 4, 24, 1)) == 1_474_560
    assert 2 * 24 * REGISTRY["a_log_delta"].count(DeltaConfig(), vim) == 589_824
    # LoRA_p(X) r64: 1,769K (+9K head = 1,778K); LoRA(out_proj) r96: 2,654K (2,663K); LoRA(x_proj) r64, two
    # scan directions, R = 24: 2,531K (2,540K); Conv1d-tuning, two directions: 147K (156K).
    vim24 = ModelDims(D=384, E=768, N=16, R=24, K=4, L=24, V=1)
    assert REGISTRY["lora_in_proj_x"].count(LoraConfig(rank=64), vim24) == 1_769_472
    assert REGISTRY["lora_out_proj"].count(LoraConfig(rank=96), vim24) == 2_654_208
    assert 2 * REGISTRY["lora_x_proj"].count(LoraConfig(rank=64), vim24) == 2_531_328
    assert 2 * REGISTRY["conv1d_delta"].count(DeltaConfig(), vim24) == 147_456
    # SDT's LoRA part on mamba-130m (D=768, E=1536): r8 on out_proj = 8 * 2304 per layer.
    assert REGISTRY["lora_out_proj"].count(LoraConfig(rank=8), ModelDims(768, 1536, 16, 48, 4, 1, 1)) == 18_432


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_every_trainable_tensor_gets_a_nonzero_gradient(tiny_lm, tiny_ids, combo):
    applied = apply_methods(tiny_lm, methods_of(combo))
    perturb(applied)
    tiny_lm.train()
    tiny_lm(tiny_ids).logits.square().mean().backward()
    for name, p in tiny_lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_identity_at_init_and_output_changes_once_perturbed(tiny_lm, tiny_ids, combo):
    with torch.no_grad():
        before = tiny_lm(tiny_ids).logits
        applied = apply_methods(tiny_lm, methods_of(combo))
        assert torch.equal(tiny_lm(tiny_ids).logits, before)
        perturb(applied)
        assert not torch.allclose(tiny_lm(tiny_ids).logits, before, atol=1e-6)


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_tensors_of_different_methods_never_alias(tiny_lm, combo):
    applied = apply_methods(tiny_lm, methods_of(combo))
    ptrs = [p.data_ptr() for ps in applied.params.values() for p in ps]
    assert len(ptrs) == len(set(ptrs))


MERGEABLE = [c for c in COMBOS if all(REGISTRY[n].mergeable for n in methods_of(c))]
MERGEABLE.append(tuple(n for n in PLAIN if REGISTRY[n].mergeable))


@pytest.mark.parametrize("combo", MERGEABLE, ids=ids)
def test_merged_plain_checkpoint_reproduces_the_adapted_model(tiny_lm, tiny_ids, tmp_path, combo):
    applied = apply_methods(tiny_lm, methods_of(combo))
    perturb(applied)
    with torch.no_grad():
        adapted = tiny_lm(tiny_ids).logits
    merge_methods(tiny_lm)
    tiny_lm.save_pretrained(tmp_path)
    plain = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(".parametrizations." in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        merged = plain(tiny_ids).logits
    assert ((merged - adapted).abs().max() / adapted.abs().max()) < 1e-5


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_saved_adapters_load_back_onto_a_fresh_base_model(tiny_lm, tiny_ids, tmp_path, combo):
    tiny_lm.save_pretrained(tmp_path / "base")
    methods = methods_of(combo)
    perturb(apply_methods(tiny_lm, methods))
    with torch.no_grad():
        adapted = tiny_lm(tiny_ids).logits
    save_adapters(tiny_lm, methods, tmp_path / "adapter", extra={"head.weight": torch.ones(2, 3)})
    fresh = MambaForCausalLM.from_pretrained(tmp_path / "base").eval()
    applied, extra = load_adapters(fresh, tmp_path / "adapter")
    assert set(applied.params) == set(methods)
    assert torch.equal(extra["head.weight"], torch.ones(2, 3))
    with torch.no_grad():
        assert torch.allclose(fresh(tiny_ids).logits, adapted, atol=1e-6)


def test_lora_rank_above_the_weight_size_is_refused(tiny_lm):
    with pytest.raises(MethodError, match=r"lora_in_proj.rank 99 exceeds the adapted block"):
        apply_methods(tiny_lm, {"lora_in_proj": LoraConfig(rank=99)})


def test_unknown_method_is_refused(tiny_lm):
    with pytest.raises(MethodError, match="unknown method"):
        apply_methods(tiny_lm, {"prefix": LoraConfig()})


def test_param_groups_carry_each_methods_multipliers(tiny_lm):
    applied = apply_methods(tiny_lm, {"lora_in_proj": LoraConfig(lr_mult=2.0, weight_decay_mult=0.0),
                                      "a_log_delta": DeltaConfig(lr_mult=0.5, weight_decay_mult=10.0)})
    groups = {g["name"]: g for g in applied.param_groups(lr=1e-3, weight_decay=1e-4)}
    assert groups["lora_in_proj"]["lr"] == pytest.approx(2e-3) and groups["lora_in_proj"]["weight_decay"] == 0
    assert groups["a_log_delta"]["lr"] == pytest.approx(5e-4)
    assert groups["a_log_delta"]["weight_decay"] == pytest.approx(1e-3)


def test_partial_lora_changes_only_its_block_of_rows(tiny_lm):
    from trials.methods import apply_methods as apply

    applied = apply(tiny_lm, {"lora_x_proj_b": LoraConfig(rank=2)})
    perturb(applied)
    mixer = tiny_lm.backbone.layers[0].mixer
    delta = mixer.x_proj.weight - mixer.x_proj.parametrizations.weight.original  # [R + 2N, E]
    r, n = mixer.time_step_rank, mixer.ssm_state_size
    assert delta[r : r + n].abs().sum() > 0
    assert delta[:r].abs().sum() == 0 and delta[r + n :].abs().sum() == 0


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_and_dora_on_in_proj_match_the_peft_library(tiny_lm, tiny_ids, dora):
    """Independent check: HF peft's LoRA / DoRA (row-wise norm) with the same A, B (and magnitude) give the
    same outputs."""
    import copy

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    reference = get_peft_model(copy.deepcopy(tiny_lm), PeftLoraConfig(
        r=2, lora_alpha=2 * 0.7, target_modules=["in_proj"], lora_dropout=0.0, use_dora=dora))
    applied = apply_methods(tiny_lm, {"lora_in_proj": LoraConfig(rank=2, scale=0.7, dora=dora)})
    perturb(applied)
    ours = dict(tiny_lm.named_parameters())
    with torch.no_grad():
        for i in range(tiny_lm.config.num_hidden_layers):
            prefix = f"backbone.layers.{i}.mixer.in_proj.parametrizations.weight.0"
            layer = reference.base_model.model.backbone.layers[i].mixer.in_proj
            layer.lora_A["default"].weight.copy_(ours[f"{prefix}.lora_A"])
            layer.lora_B["default"].weight.copy_(ours[f"{prefix}.lora_B"])
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(ours[f"{prefix}.magnitude"])
        expected = reference.eval()(tiny_ids).logits
        got = tiny_lm(tiny_ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_merging_a_non_mergeable_method_is_refused_and_changes_nothing(tiny_lm, tiny_ids):
    applied = apply_methods(tiny_lm, {"parallel_adapter": CONFIGS["parallel_adapter"],
                                      "a_log_delta": CONFIGS["a_log_delta"]})
    perturb(applied)
    with torch.no_grad():
        before = tiny_lm(tiny_ids).logits
    with pytest.raises(MethodError, match="parallel_adapter is not a weight delta"):
        merge_methods(tiny_lm)
    with torch.no_grad():
        assert torch.equal(tiny_lm(tiny_ids).logits, before)
