"""The method matrix: every method and every combination the registry allows goes through the same checks."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaForCausalLM

from space.methods import (
    METHOD_SPACES,
    AdditionalScanConfig,
    AffixConfig,
    DeltaConfig,
    InitialStateConfig,
    LoraConfig,
    ProdialConfig,
    PromptConfig,
    SdtConfig,
    SdtLayer,
)
from trials.methods import (
    REGISTRY,
    MethodError,
    ModelDims,
    apply_methods,
    count_params,
    load_adapters,
    merge_methods,
    save_adapters,
    supported,
)
from trials.models.loading import use_scan
from trials.models.mamba1 import dims as mamba1_dims

# Test-sized configs for the tiny model (D=32, E=64, N=4, R=2, K=4, 2 layers); the rest use their defaults.
SIZED = {
    "parallel_adapter": METHOD_SPACES["parallel_adapter"][1](rank=3, scale=0.5),
    "prodial_in_proj": ProdialConfig(block_size=8, rank=2, scale=0.7),
    "prodial_out_proj": ProdialConfig(block_size=16, rank=2, scale=0.7),
    "prompt_tuning": PromptConfig(tokens=2),
    "affix_tuning": AffixConfig(tokens=2),
    "additional_scan": AdditionalScanConfig(states=2),
    # Two of E=64 channels and two of N=4 states per layer, as a warm-up would have chosen them.
    "sdt": SdtConfig(freeze_channel=62 / 64, freeze_state=0.5, selection=(
        SdtLayer(channels=(1, 5), states=((0, 2), (1, 3))), SdtLayer(channels=(7, 63), states=((3, 0), (2, 1))))),
}
# This matrix is Mamba-1's: every method the registry supports on it (the other architectures' matrix is in
# test_methods_mamba2.py).
MAMBA1 = [name for name in METHOD_SPACES if supported(name, "mamba") is None]
CONFIGS = {name: (LoraConfig(rank=2, scale=0.7) if name.startswith("lora_") else SIZED.get(name, config_cls()))
           for name, (_, config_cls) in METHOD_SPACES.items() if name in MAMBA1}
# Variants: DoRA on every LoRA target, and each method's switches.
CONFIGS.update({f"{name}+dora": LoraConfig(rank=2, scale=0.7, dora=True) for name in MAMBA1
                if name.startswith("lora_")})
CONFIGS.update({
    "lora_in_proj+alpha+dropout": LoraConfig(rank=2, alpha=4.0, dropout=0.2),
    "lora_out_proj+dropout": LoraConfig(rank=2, scale=0.5, dropout=0.3),
    "prompt_tuning+suffix": PromptConfig(tokens=2, position="suffix"),
    "prompt_tuning+prefix_suffix+projection": PromptConfig(tokens=2, position="prefix_suffix", projection=True),
    "affix_tuning+projection": AffixConfig(tokens=2, projection=True),
    "initial_state+conv_state": InitialStateConfig(conv_state=True),
})
# Every method alone, every method at once, and pairs that stack two methods on one tensor or one state.
PLAIN = [name for name in CONFIGS if "+" not in name]
COMBOS = ([(name,) for name in CONFIGS] + [tuple(PLAIN)]
          + [("lora_in_proj", "lora_in_proj_x"), ("lora_x_proj_b", "lora_x_proj_c"), ("a_log_delta", "lora_x_proj"),
             ("lora_in_proj_x+dora", "lora_in_proj_z"), ("lora_in_proj", "prodial_in_proj"),
             ("sdt", "a_log_delta", "lora_x_proj", "additional_scan"), ("additional_scan", "initial_state",
                                                                         "state_offset", "affix_tuning"),
             ("lora_embeddings", "lora_halloran", "prompt_tuning+prefix_suffix+projection"),
             ("bitfit", "dt_bias_delta", "conv1d_delta", "lora_conv1d")])


def needs_project_mixer(name: str) -> bool:
    return getattr(REGISTRY[name], "needs_project_mixer", False)


def on_transformers_path(lm) -> bool:
    from trials.models.mamba1_mixer import FastMambaMixer

    return not isinstance(lm.backbone.layers[0].mixer, FastMambaMixer)


def methods_of(combo, lm=None) -> dict:
    """``{"lora_out_proj+dora": cfg}`` -> ``{"lora_out_proj": cfg}``: the variant is in the config.

    On transformers' own scan paths the methods that need the project's mixer are refused (tested below), so
    there the all-methods combination leaves them out and a combination of only such methods is skipped."""
    methods = {name.split("+")[0]: CONFIGS[name] for name in combo}
    if lm is not None and on_transformers_path(lm):
        methods = {n: c for n, c in methods.items() if not needs_project_mixer(n)}
        if len(methods) < len({n.split("+")[0] for n in combo}) and len(combo) < len(PLAIN):
            pytest.skip("needs the project's mixer; the refusal on this path is tested separately")
    return methods


def forward(lm, ids):
    """Logits without a generation cache (in eval mode transformers would otherwise take its cached path)."""
    return lm(ids, use_cache=False).logits


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
    assert set(REGISTRY) == set(METHOD_SPACES)
    assert set(PLAIN) == set(MAMBA1)


def test_methods_that_need_the_project_mixer_are_refused_on_transformers_paths(tiny_lm):
    names = [n for n in PLAIN if needs_project_mixer(n)]
    assert names == ["affix_tuning", "initial_state", "state_offset"]
    for name in names:
        if on_transformers_path(tiny_lm):
            with pytest.raises(MethodError, match=rf"{name} needs the project's mixer.*use model.scan auto"):
                apply_methods(tiny_lm, {name: CONFIGS[name]})
        else:
            apply_methods(tiny_lm, {name: CONFIGS[name]})


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_measured_count_equals_closed_form_and_combined_count_is_the_sum(tiny_lm, combo):
    methods = methods_of(combo, tiny_lm)
    dims = ModelDims.from_config(tiny_lm.config)  # the base sizes (additional-scan enlarges the state)
    applied = apply_methods(tiny_lm, methods)
    trainable = sum(p.numel() for p in tiny_lm.parameters() if p.requires_grad)
    formula = count_params(methods, dims)
    assert trainable == sum(formula.values())
    assert applied.num_params() == formula


def test_closed_forms_reproduce_the_reference_per_layer_counts():
    # peft-methods.md: LoRA(in_proj) r32 on Vim-S (D=384, E=768): r(D+2E) = 61,440 per layer, 1,475K over 24;
    # A-tuning: E*N = 12,288 per layer per scan direction (x2 on Vim, x24 layers = 589,824, +9K head = 598K).
    vim = mamba1_dims(D=384, E=768, N=16, R=24, K=4, L=1, V=1)
    assert REGISTRY["lora_in_proj"].count(LoraConfig(rank=32), vim) == 61_440
    assert REGISTRY["lora_in_proj"].count(LoraConfig(rank=32), mamba1_dims(384, 768, 16, 24, 4, 24, 1)) == 1_474_560
    assert 2 * 24 * REGISTRY["a_log_delta"].count(DeltaConfig(), vim) == 589_824
    # LoRA_p(X) r64: 1,769K (+9K head = 1,778K); LoRA(out_proj) r96: 2,654K (2,663K); LoRA(x_proj) r64, two
    # scan directions, R = 24: 2,531K (2,540K); Conv1d-tuning, two directions: 147K (156K).
    vim24 = mamba1_dims(D=384, E=768, N=16, R=24, K=4, L=24, V=1)
    assert REGISTRY["lora_in_proj_x"].count(LoraConfig(rank=64), vim24) == 1_769_472
    assert REGISTRY["lora_out_proj"].count(LoraConfig(rank=96), vim24) == 2_654_208
    assert 2 * REGISTRY["lora_x_proj"].count(LoraConfig(rank=64), vim24) == 2_531_328
    assert 2 * REGISTRY["conv1d_delta"].count(DeltaConfig(), vim24) == 147_456
    # SDT's LoRA part on mamba-130m (D=768, E=1536): r8 on out_proj = 8 * 2304 per layer.
    assert REGISTRY["lora_out_proj"].count(LoraConfig(rank=8), mamba1_dims(768, 1536, 16, 48, 4, 1, 1)) == 18_432


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_every_trainable_tensor_gets_a_nonzero_gradient(tiny_lm, tiny_ids, combo):
    applied = apply_methods(tiny_lm, methods_of(combo, tiny_lm))
    perturb(applied)
    tiny_lm.train()
    forward(tiny_lm, tiny_ids).square().mean().backward()
    for name, p in tiny_lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_identity_at_init_and_output_changes_once_perturbed(tiny_lm, tiny_ids, combo):
    methods = methods_of(combo, tiny_lm)
    with torch.no_grad():
        before = forward(tiny_lm, tiny_ids)
        applied = apply_methods(tiny_lm, methods)
        if all(getattr(REGISTRY[n], "identity_at_init", True) for n in methods):
            # The state hooks move the mixer off the torch scan's plain path, hence a tolerance, not equality.
            assert torch.allclose(forward(tiny_lm, tiny_ids), before, rtol=0, atol=1e-6)
        changed = forward(tiny_lm, tiny_ids)
        perturb(applied)
        assert not torch.allclose(forward(tiny_lm, tiny_ids), changed, atol=1e-6)


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_tensors_of_different_methods_never_alias(tiny_lm, combo):
    applied = apply_methods(tiny_lm, methods_of(combo, tiny_lm))
    ptrs = [p.data_ptr() for ps in applied.params.values() for p in ps]
    assert len(ptrs) == len(set(ptrs))


def scan_of(lm) -> str:
    mixer = lm.backbone.layers[0].mixer
    return getattr(mixer, "scan_impl", "mambapy" if getattr(mixer, "use_mambapy", False) else "hf_loop")


MERGEABLE = [c for c in COMBOS if all(REGISTRY[n].mergeable for n in methods_of(c))]
MERGEABLE.append(tuple(n for n in PLAIN if REGISTRY[n].mergeable))


@pytest.mark.parametrize("combo", MERGEABLE, ids=ids)
def test_merged_plain_checkpoint_reproduces_the_adapted_model(tiny_lm, tiny_ids, tmp_path, combo):
    applied = apply_methods(tiny_lm, methods_of(combo, tiny_lm))
    perturb(applied)
    with torch.no_grad():
        adapted = forward(tiny_lm, tiny_ids)
    merge_methods(tiny_lm)
    tiny_lm.save_pretrained(tmp_path)
    plain = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(".parametrizations." in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        merged = forward(plain, tiny_ids)
    assert ((merged - adapted).abs().max() / adapted.abs().max()) < 1e-5


@pytest.mark.parametrize("combo", COMBOS, ids=ids)
def test_saved_adapters_load_back_onto_a_fresh_base_model(tiny_lm, tiny_ids, tmp_path, combo):
    tiny_lm.save_pretrained(tmp_path / "base")
    methods = methods_of(combo, tiny_lm)
    perturb(apply_methods(tiny_lm, methods))
    with torch.no_grad():
        adapted = forward(tiny_lm, tiny_ids)
    save_adapters(tiny_lm, methods, tmp_path / "adapter", extra={"head.weight": torch.ones(2, 3)})
    fresh = use_scan(MambaForCausalLM.from_pretrained(tmp_path / "base"), scan_of(tiny_lm)).eval()
    applied, extra = load_adapters(fresh, tmp_path / "adapter")
    assert set(applied.params) == set(methods)
    assert torch.equal(extra["head.weight"], torch.ones(2, 3))  # saved and loaded, not computed: exact
    with torch.no_grad():
        assert torch.allclose(forward(fresh, tiny_ids), adapted, atol=1e-6)


def test_lora_rank_above_the_weight_size_is_refused(tiny_lm):
    with pytest.raises(MethodError, match=r"rank 99 exceeds the adapted block.*lora_in_proj: backbone.layers.0"):
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
        assert torch.allclose(tiny_lm(tiny_ids).logits, before, rtol=1e-5, atol=1e-6)
