"""The method matrix on Mamba-2 and the hybrids: every method each architecture supports goes through the same
checks as on Mamba-1 (closed-form count, live gradients, no silent bypass, merge into a plain checkpoint that
AutoModelForCausalLM reloads, adapters saved and loaded), on tiny models built here."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    BambaForCausalLM,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
)

from space.methods import (
    METHOD_SPACES,
    AdapterConfig,
    AdditionalScanConfig,
    AffixConfig,
    InitialStateConfig,
    LoraConfig,
    ProdialConfig,
    PromptConfig,
)
from tests.trials.methods.test_methods import forward, perturb
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
from trials.models.interface import mixer_kinds


def tiny_mamba2() -> Mamba2ForCausalLM:
    # hidden 32, 2 layers, 8 heads x head_dim 8, 8 groups, state 2, chunk 8 (mamba2-hybrids.md).
    return Mamba2ForCausalLM(Mamba2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                                          n_groups=8, state_size=2, chunk_size=8, expand=2))


def tiny_bamba() -> BambaForCausalLM:
    # hidden 32, 4 layers with attention at 1 and 3, 16 heads, 1 group, state 16.
    return BambaForCausalLM(BambaConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=4, attn_layer_indices=[1, 3], num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, mamba_n_heads=16, mamba_d_head=4, mamba_n_groups=1,
        mamba_d_state=16, mamba_chunk_size=8, mamba_expand=2, initializer_range=0.25))


def tiny_granite() -> GraniteMoeHybridForCausalLM:
    # The same shape plus Granite's shared MLP (input_linear = gate | up) and two MoE experts, both used by every
    # token (so each expert's adapter gets a gradient from any batch).
    return GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=24, shared_intermediate_size=48,
        num_local_experts=2, num_experts_per_tok=2, mamba_n_heads=16, mamba_d_head=4, mamba_n_groups=1,
        mamba_d_state=16, mamba_chunk_size=8, mamba_expand=2, initializer_range=0.25))


def fixture_model(model_type: str):
    """The loader's tiny fixture of ``model_type`` (trials.models.fixtures), with weights large enough that the
    scan's state term is not lost in float noise (at the default 0.02 init, B C x is ~1e-6 of the output)."""
    from transformers import AutoModelForCausalLM

    from trials.models.fixtures import tiny_config

    config = tiny_config(model_type)
    config.initializer_range = 0.25
    return AutoModelForCausalLM.from_config(config)


def with_project_mixer(builder):
    def build():
        from trials.models.mamba2_mixer import install_fast_mamba2_mixer

        lm = builder()
        install_fast_mamba2_mixer(lm, "torch")
        return lm
    return build


def _has_project_mamba2_mixer() -> bool:
    try:
        import trials.models.mamba2_mixer  # noqa: F401
    except ImportError:
        return False
    return True


BUILDERS = {"mamba2": tiny_mamba2, "bamba": tiny_bamba, "granitemoehybrid": tiny_granite,
            "falcon_h1": lambda: fixture_model("falcon_h1"), "nemotron_h": lambda: fixture_model("nemotron_h")}
HOOK_METHODS = ("affix_tuning", "initial_state", "state_offset", "parallel_adapter")
# The project's Mamba-2 mixer runs every method on Mamba-2; on the hybrids it runs, the hook methods (the rest is
# the same weight code as above).
if _has_project_mamba2_mixer():
    for _arch in ("mamba2", "bamba", "granitemoehybrid", "nemotron_h"):
        BUILDERS[f"{_arch}+project_mixer"] = with_project_mixer(BUILDERS[_arch])

SIZED = {
    "prodial_in_proj": ProdialConfig(block_size=8, rank=2, scale=0.7),
    "prodial_out_proj": ProdialConfig(block_size=16, rank=2, scale=0.7),
    "prompt_tuning": PromptConfig(tokens=2),
    "affix_tuning": AffixConfig(tokens=2),
    "initial_state": InitialStateConfig(conv_state=True),
    "parallel_adapter": AdapterConfig(rank=3, scale=0.5),
    "additional_scan": AdditionalScanConfig(states=2),
}


def config(name: str):
    base = name.split("+")[0]
    if base.startswith("lora_"):
        return LoraConfig(rank=2, scale=0.7, dora=name.endswith("+dora"))
    return SIZED.get(base, METHOD_SPACES[base][1]())


def methods_for(arch: str) -> list[str]:
    """The methods this fixture runs: those its model type supports; the hook methods only where the project's
    mixer runs the model (transformers' forward honours none of them: refused, tested below)."""
    model_type = arch.split("+")[0]
    names = [n for n in METHOD_SPACES if supported(n, model_type) is None]
    if not arch.endswith("+project_mixer"):
        names = [n for n in names if n not in HOOK_METHODS]
    elif model_type != "mamba2":
        names = [n for n in names if n in HOOK_METHODS]
    names += [f"{n}+dora" for n in names if n.startswith("lora_")]
    return names


CASES = [(arch, (name,)) for arch in BUILDERS for name in methods_for(arch)]
CASES += [(arch, tuple(n for n in methods_for(arch) if "+" not in n)) for arch in BUILDERS]  # all at once


def case_id(case) -> str:
    arch, combo = case
    return f"{arch}-{'all' if len(combo) > 2 else '&'.join(combo)}"


def build(arch: str):
    torch.manual_seed(0)
    return BUILDERS[arch]().eval()


def methods_of(combo, lm=None) -> dict:
    """The configs of ``combo``; SDT's with a selection fitted to ``lm`` (what its warm-up would hand it), drawn
    from seeded random warm-up deltas."""
    methods = {name.split("+")[0]: config(name) for name in combo}
    if "sdt" in methods and lm is not None:
        from trials.methods.sdt import select_heads

        mixer = ModelDims.from_model(lm).mixer
        gen = torch.Generator().manual_seed(5)
        layers = len(mixer_kinds(lm))
        a_log = [torch.randn(mixer.heads, generator=gen) for _ in range(layers)]
        conv = [torch.randn(mixer.conv_channels, 1, mixer.conv_kernel, generator=gen) for _ in range(layers)]
        selection = select_heads(a_log, conv, mixer.head_dim, methods["sdt"])
        methods["sdt"] = methods["sdt"].model_copy(update={"selection": tuple(selection)})
    return methods


@pytest.fixture
def ids():
    return torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_measured_count_equals_closed_form(case):
    arch, combo = case
    lm = build(arch)
    dims = ModelDims.from_model(lm)
    methods = methods_of(combo, lm)
    apply_methods(lm, methods)
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert trainable == sum(count_params(methods, dims).values()) > 0


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_tensor_is_live_and_changes_the_output(case, ids):
    arch, combo = case
    lm = build(arch)
    before = forward(lm, ids).detach()
    methods = methods_of(combo, lm)
    applied = apply_methods(lm, methods)
    if all(getattr(REGISTRY[n], "identity_at_init", True) for n in methods):
        torch.testing.assert_close(forward(lm, ids), before, rtol=1e-5, atol=1e-5)
    perturb(applied)
    out = forward(lm, ids)
    assert (out - before).abs().max() > 1e-4  # no silent bypass: the perturbed tensors reach the output
    out.square().mean().backward()
    for name, ps in applied.params.items():
        for p in ps:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: a tensor {tuple(p.shape)} got no gradient"


MERGEABLE = [c for c in CASES if all(REGISTRY[n].mergeable for n in methods_of(c[1]))]
MERGEABLE += [(arch, tuple(n for n in methods_for(arch) if "+" not in n and REGISTRY[n].mergeable))
              for arch in BUILDERS]


@pytest.mark.parametrize("case", MERGEABLE, ids=case_id)
def test_merged_plain_checkpoint_reloads_with_the_same_logits(case, ids, tmp_path):
    arch, combo = case
    lm = build(arch)
    applied = apply_methods(lm, methods_of(combo, lm))
    perturb(applied)
    adapted = forward(lm, ids).detach()
    merge_methods(lm)
    lm.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == lm.config.architectures[0]
    torch.testing.assert_close(forward(reloaded, ids), adapted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_saved_adapters_load_back_onto_a_fresh_base_model(arch, ids, tmp_path):
    combo = tuple(n for n in methods_for(arch) if "+" not in n)
    lm = build(arch)
    methods = methods_of(combo, lm)
    applied = apply_methods(lm, methods)
    perturb(applied)
    adapted = forward(lm, ids).detach()
    save_adapters(lm, methods, tmp_path)
    fresh = build(arch)
    load_adapters(fresh, tmp_path)
    torch.testing.assert_close(forward(fresh, ids), adapted, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model_type", "method", "reason"), [
    ("mamba2", "lora_x_proj", "no x_proj.*use lora_in_proj_b"),
    ("mamba2", "lora_x_proj_b", "no x_proj.*use lora_in_proj_b"),
    ("mamba2", "lora_dt_proj", "no dt_proj.*lora_in_proj_dt"),
    ("mamba", "lora_in_proj_b", "in_proj holds x and z only.*lora_x_proj_b"),
    ("mamba", "gated_norm_delta", "no norm tensor"),
    ("mamba2", "lora_attn_q", "mamba2 has no attention layers"),
    ("mamba", "lora_mlp_up", "mamba has no MLP layers"),
    ("jamba", "lora_in_proj", "model_type 'jamba' is not supported"),
    ("falcon_h1", "gated_norm_delta", "falcon_h1's mixers are built without the norm tensor"),
    ("falcon_h1", "additional_scan", "the state cannot grow"),
    ("falcon_h1", "initial_state", "does not run falcon_h1's mixer"),
    ("nemotron_h", "lora_mlp_gate", "nemotron_h's MLP has no gate projection"),
])
def test_unsupported_combinations_are_refused_with_the_reason(model_type, method, reason):
    assert supported(method, model_type) is not None
    assert re.search(reason, supported(method, model_type) or "")


def test_applying_a_refused_method_names_method_architecture_and_reason():
    lm = build("mamba2")
    frozen = [p.requires_grad for p in lm.parameters()]
    with pytest.raises(MethodError, match=r"lora_x_proj_c is not supported on mamba2: .*no x_proj"):
        apply_methods(lm, {"lora_in_proj": LoraConfig(rank=2), "lora_x_proj_c": LoraConfig(rank=2)})
    assert [p.requires_grad for p in lm.parameters()] == frozen  # refused before anything was frozen or added


@pytest.mark.parametrize("method", HOOK_METHODS)
def test_hook_methods_are_refused_on_transformers_mamba2_forward(method):
    lm = build("mamba2")
    refused = rf"{method} needs the project's mixer|does not honour|project's Mamba-2 mixer"
    with pytest.raises(MethodError, match=refused):
        apply_methods(lm, {method: config(method)})


@pytest.mark.parametrize(("block", "rows"), [("z", (0, 64)), ("x", (64, 128)), ("b", (128, 144)), ("c", (144, 160)),
                                             ("dt", (160, 168))])
def test_lora_on_an_in_proj_block_changes_only_that_blocks_rows(block, rows):
    lm = build("mamba2")
    mixer = mixer_kinds(lm)[0]
    assert (mixer.spec.projection("in_proj").block(block).start, mixer.spec.projection("in_proj").block(block).stop) \
        == rows
    before = mixer.projection("in_proj").weight.detach().clone()
    perturb(apply_methods(lm, {f"lora_in_proj_{block}": LoraConfig(rank=2)}))
    changed = (mixer.projection("in_proj").weight.detach() - before).abs().sum(dim=1) > 0  # [rows]
    assert changed.nonzero().squeeze(1).tolist() == list(range(*rows))


def test_granite_gate_and_up_adapt_their_halves_of_the_fused_input_linear():
    lm = build("granitemoehybrid")
    linear = lm.model.layers[0].shared_mlp.input_linear
    before = linear.weight.detach().clone()
    perturb(apply_methods(lm, {"lora_mlp_up": LoraConfig(rank=2)}))
    changed = ((linear.weight.detach() - before).abs().sum(dim=1) > 0).nonzero().squeeze(1).tolist()
    assert changed == list(range(48, 96))


def test_moe_lora_gives_each_expert_its_own_delta_on_its_rows():
    lm = build("granitemoehybrid")
    experts = lm.model.layers[0].block_sparse_moe.experts
    before = experts.gate_up_proj.detach().clone()  # [2, 2F, D], gate | up per expert
    perturb(apply_methods(lm, {"lora_moe_gate": LoraConfig(rank=2)}))
    delta = experts.gate_up_proj.detach() - before
    assert delta[:, 24:].abs().max() == 0 and delta[0, :24].abs().min() > 0 and delta[1, :24].abs().min() > 0
    assert (delta[0, :24] - delta[1, :24]).abs().max() > 0  # one delta per expert, not a shared one


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"])
@pytest.mark.parametrize("position", ["prefix", "suffix", "prefix_suffix"])
def test_prompt_outputs_do_not_depend_on_right_or_left_padding(arch, position):
    lm = build(arch)
    perturb(apply_methods(lm, {"prompt_tuning": PromptConfig(tokens=2, position=position)}))
    ids = torch.randint(3, 40, (1, 7), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        alone = lm(ids, use_cache=False).logits[0]  # [7, V]
        right = lm(torch.cat([ids, pad], 1), attention_mask=torch.tensor([[1] * 7 + [0] * 3]),
                   use_cache=False).logits[0, :7]
        left = lm(torch.cat([pad, ids], 1), attention_mask=torch.tensor([[0] * 3 + [1] * 7]),
                  use_cache=False).logits[0, 3:]
    torch.testing.assert_close(right, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"])
def test_a_prefix_prompt_generates_the_same_tokens_with_and_without_the_cache(arch):
    lm = build(arch)
    perturb(apply_methods(lm, {"prompt_tuning": PromptConfig(tokens=2)}))
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached = lm.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = lm.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.tolist() == uncached.tolist()


@pytest.mark.parametrize("arch", ["mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"])
def test_prompt_tuning_embeds_the_real_tokens_as_the_model_does(arch, ids):
    """With a prompt the model is handed inputs_embeds; the real tokens' rows must be what it would embed from
    input_ids itself (Falcon-H1 multiplies those, and not given inputs_embeds, by its embedding_multiplier)."""
    lm = build(arch)
    seen = []
    first = lm.base_model.layers[0]
    first.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                    with_kwargs=True)
    with torch.no_grad():
        lm(ids, use_cache=False)
        apply_methods(lm, {"prompt_tuning": PromptConfig(tokens=2)})
        lm(ids, use_cache=False)
    plain, prompted = seen  # [B, L, D], [B, 2 + L, D]
    torch.testing.assert_close(prompted[:, 2:], plain)


@pytest.mark.parametrize("model_type", ["mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"])
def test_the_probe_reads_the_architecture_of_a_loaded_checkpoint_and_counts_its_methods(model_type, tmp_path):
    from space.config import ModelSpec, TaskSpec, TrialConfig
    from trials.models.fixtures import write_fixture
    from trials.probe import Probe

    path = write_fixture(model_type, tmp_path / model_type)
    model, task = ModelSpec(checkpoint=str(path)), TaskSpec(name="digits", shots_per_class=2)
    probe = Probe(model, task)
    assert probe.model_type == model_type
    assert "lora_x_proj" in probe.refusals(["lora_x_proj", "lora_in_proj_b"])
    methods = {"lora_in_proj_b": LoraConfig(rank=2), "a_log_delta": {}}
    if model_type != "mamba2":
        methods["lora_attn_v"] = LoraConfig(rank=2)
    cfg = TrialConfig(model=model, task=task, methods=methods)
    dims = probe.dims
    expected = sum(count_params(cfg.methods, dims).values()) + dims.D * probe.num_classes + probe.num_classes
    assert probe.trainable(cfg) == expected > 0


@pytest.mark.parametrize("model_type", ["mamba2", "granitemoehybrid"])
def test_a_trial_trains_ssm_and_attention_side_methods_on_a_loaded_checkpoint(model_type, tmp_path):
    from space.config import TrialConfig
    from tests.conftest import small_trial_yaml
    from trials.models.fixtures import write_fixture
    from trials.run import build_trial, run_trial

    path = write_fixture(model_type, tmp_path / model_type)
    methods = "lora_in_proj_b: {rank: 2}\n  dt_bias_delta: {}\n  gated_norm_delta: {}"
    if model_type != "mamba2":
        methods += "\n  lora_attn_v: {rank: 2}\n  lora_moe_up: {rank: 2}"
    cfg = TrialConfig.from_yaml(small_trial_yaml(methods=methods, steps=2, eval_every=2, checkpoint=str(path)))
    built = build_trial(cfg)  # checks the measured trainable count against the closed form
    result = run_trial(cfg, steps=2, built=built)
    assert set(result.method_params) == set(cfg.methods) and all(v > 0 for v in result.method_params.values())
    assert 0.0 <= result.val_accuracy <= 1.0


def test_lora_dropout_on_mamba2_out_proj_runs_under_the_project_mixer_and_is_refused_otherwise(ids):
    pytest.importorskip("trials.models.mamba2_mixer")
    with pytest.raises(MethodError, match=r"lora_out_proj.dropout 0.5: backbone.layers.0.mixer.out_proj is not called"):
        apply_methods(build("mamba2"), {"lora_out_proj": LoraConfig(rank=2, dropout=0.5)})
    lm = build("mamba2+project_mixer")
    perturb(apply_methods(lm, {"lora_out_proj": LoraConfig(rank=2, dropout=0.5)}))
    evaluated = forward(lm, ids)
    lm.train()
    torch.manual_seed(0)
    assert (forward(lm, ids) - evaluated).abs().max() > 1e-4  # the dropout hook ran in training


def test_mamba2_additional_scan_inserts_each_groups_new_b_and_c_rows_after_its_own():
    lm = build("mamba2")  # I=64, G=8, N=2, H=8; n=2 more states per group
    mixer = mixer_kinds(lm)[0]
    before = {"in": mixer.projection("in_proj").weight.detach().clone(),
              "conv": mixer.module.conv1d.weight.detach().clone()}
    apply_methods(lm, {"additional_scan": AdditionalScanConfig(states=2)})
    merge_methods(lm)
    assert lm.config.state_size == 4 and mixer.module.ssm_state_size == 4
    weight, conv = mixer.projection("in_proj").weight.detach(), mixer.module.conv1d.weight.detach()
    assert weight.shape == (64 + 64 + 2 * 8 * 4 + 8, 32) and conv.shape == (64 + 2 * 8 * 4, 1, 4)
    for g in range(8):
        for old, new in ((128, 128), (144, 160)):  # the B block, then the C block (after the enlarged B)
            torch.testing.assert_close(weight[new + 4 * g : new + 4 * g + 2],
                                       before["in"][old + 2 * g : old + 2 * g + 2])
            torch.testing.assert_close(conv[new - 64 + 4 * g : new - 64 + 4 * g + 2],
                                       before["conv"][old - 64 + 2 * g : old - 64 + 2 * g + 2])
    torch.testing.assert_close(weight[:128], before["in"][:128])  # z | x unchanged
    torch.testing.assert_close(weight[-8:], before["in"][-8:])  # dt unchanged


def test_values_a_model_cannot_take_are_refused_before_any_trial_naming_method_and_reason():
    from space.config import SearchSpace
    from trials.methods import config_refusals

    dims = ModelDims.from_model(build("mamba2"))  # H = 8 dt rows, K = 4, D = 32
    space = SearchSpace.model_validate({"methods": {
        "lora_in_proj_dt": {"rank": {"low": 2, "high": 16}},  # the range's end exceeds the 8 dt rows
        "lora_out_proj": {"dropout": {"choices": [0.0, 0.1]}},  # out_proj is not hookable under transformers' forward
        "lora_conv1d": {"rank": 4},
        "prodial_in_proj": {"block_size": {"choices": [8, 12]}},  # 12 does not divide D = 32
        "lora_in_proj_b": {"rank": 2, "dropout": 0.1, "dora": {"choices": [False, True]}},
        "a_log_delta": {},
    }}).methods
    refused = config_refusals(space, dims)
    assert set(refused) == {"lora_in_proj_dt", "lora_out_proj", "prodial_in_proj", "lora_in_proj_b"}
    assert "rank 16 exceeds the adapted block's smaller side 8" in refused["lora_in_proj_dt"]
    assert "lora_out_proj.dropout 0.1: mixer.out_proj is not called as a module" in refused["lora_out_proj"]
    assert "block_size 12 does not divide the input size 32" in refused["prodial_in_proj"]
    assert "dropout with dora is not supported" in refused["lora_in_proj_b"]


def test_the_probe_refuses_a_spaces_values_the_model_cannot_take():
    from space.config import ModelSpec, SearchSpace, TaskSpec
    from trials.probe import Probe

    space = SearchSpace.model_validate({"methods": {"lora_x_proj_dt": {"rank": {"choices": [2, 8]}}}}).methods  # R = 4
    with pytest.raises(ValueError, match=r"methods\.lora_x_proj_dt: cannot be applied to this mamba checkpoint: "
                                         r"rank 8 exceeds the adapted block's smaller side 4"):
        Probe(ModelSpec(checkpoint="embedded-tiny"), TaskSpec(name="digits", shots_per_class=2), methods=space)


def test_every_method_is_supported_or_refused_with_a_reason_on_every_architecture():
    from trials.methods import support_table

    table = support_table()
    assert set(table) == set(REGISTRY)
    for method, row in table.items():
        assert set(row) == {"mamba", "mamba2", "bamba", "granitemoehybrid", "falcon_h1", "nemotron_h"}
        for arch, reason in row.items():
            assert reason is None or len(reason) > 10, (method, arch)


def test_the_readme_table_has_a_row_per_method_and_a_column_per_architecture():
    from trials.methods.registry import support_markdown

    lines = support_markdown().splitlines()
    assert lines[0] == "| method | mamba | mamba2 | bamba | granitemoehybrid | falcon_h1 | nemotron_h |"
    assert len(lines) == 2 + len(REGISTRY)
    assert "| `lora_x_proj_b` | yes | no: a mamba2 mixer has no x_proj block b" in support_markdown()


def test_the_probe_refuses_a_spaces_unsupported_methods_naming_method_architecture_and_reason():
    from space.config import ModelSpec, TaskSpec
    from trials.probe import Probe

    probe = Probe(ModelSpec(checkpoint="embedded"), TaskSpec(name="digits", shots_per_class=2))
    assert probe.model_type == "mamba" and probe.info()["model_type"] == "mamba"
    assert probe.refusals(["lora_in_proj", "a_log_delta"]) == {}
    probe.check_methods(["lora_in_proj", "lora_x_proj_b", "sdt"])
    with pytest.raises(ValueError, match=r"methods\.lora_in_proj_b: not supported on mamba \(.*lora_x_proj_b\)\); "
                                         r"methods\.lora_attn_q: not supported on mamba \(mamba has no attention"):
        probe.check_methods(["lora_in_proj", "lora_in_proj_b", "lora_attn_q"])
    with pytest.raises(ValueError, match=r"methods\.gated_norm_delta: not supported on mamba"):
        Probe(ModelSpec(checkpoint="embedded"), TaskSpec(name="digits", shots_per_class=2),
              methods=["lora_in_proj", "gated_norm_delta"])
