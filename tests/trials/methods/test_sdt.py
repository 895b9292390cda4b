"""SDT: the warm-up's selection, the sparse deltas it trains, and the trial that runs both."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MambaForCausalLM

from space.config import SearchSpace, TrialConfig, sample_trial
from space.methods import DeltaConfig, LoraConfig, SdtConfig, SdtLayer
from tests.conftest import small_trial_yaml
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
from trials.methods.sdt import select_dimensions
from trials.models.mamba1 import dims as mamba1_dims

# tiny_lm: E=64, N=4, R=2, 2 layers. freeze 0.9 / 0.5 keep c = 64 - round(57.6) = 6 channels, s = 4 - 2 = 2 states.
TINY = SdtConfig(freeze_channel=0.9, freeze_state=0.5)
C, S, E, N, R = 6, 2, 64, 4, 2


def tiny_config(**update) -> SdtConfig:
    gen = torch.Generator().manual_seed(3)
    selection = select_dimensions([torch.randn(E, N, generator=gen) for _ in range(2)], TINY)
    return TINY.model_copy(update={"selection": tuple(selection), **update})


def perturb(applied) -> None:
    """Move every method tensor off zero (no entry stays exactly at its init)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for ps in applied.params.values():
            for p in ps:
                p.add_(0.05 * (torch.rand(p.shape, generator=gen) + 0.5))


def logits(lm, ids):
    with torch.no_grad():
        return lm(ids).logits


def test_selection_keeps_the_channels_with_the_largest_squared_delta_and_their_largest_states():
    cfg = SdtConfig(freeze_channel=0.75, freeze_state=0.5)  # E=8 -> c = 2, N=4 -> s = 2
    delta = torch.full((8, 4), 0.1)
    delta[6] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # sum of squares 9: the top channel (its abs-sum 3 is not)
    delta[1] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # 4 (abs-sum 4)
    delta[3] = torch.tensor([0.2, -2.5, 0.1, 2.0])  # 10.3: the second channel, states 1 and 3 by magnitude
    (layer,) = select_dimensions([delta], cfg)
    assert layer == SdtLayer(channels=(3, 6), states=((1, 3), (0, 1)))  # ties (channel 6) go to the lower index


def test_fractions_that_keep_nothing_are_refused():
    with pytest.raises(MethodError, match=r"keep 0 of E=8 channels"):
        select_dimensions([torch.ones(8, 4)], SdtConfig(freeze_channel=0.99))
    with pytest.raises(MethodError, match=r"and 0 of N=4 states"):
        REGISTRY["sdt"].count(SdtConfig(freeze_state=1.0), mamba1_dims(32, 64, 4, 2, 4, 2, 40))


def test_closed_form_reproduces_the_reference_counts():
    # peft-methods.md #17, mamba-130m: 15 * 4 + 2 * 16 * 15 = 540 per layer; with LoRA r8 on out_proj 18,972.
    layer = mamba1_dims(D=768, E=1536, N=16, R=48, K=4, L=1, V=50280)
    assert REGISTRY["sdt"].count(SdtConfig(), layer) == 540
    sdlora = {"sdt": SdtConfig(), "lora_out_proj": LoraConfig(rank=8)}
    assert sum(count_params(sdlora, layer).values()) == 18_972
    assert REGISTRY["sdt"].count(SdtConfig(), mamba1_dims(768, 1536, 16, 48, 4, 24, 50280)) == 24 * 540


@pytest.mark.parametrize("others", [{}, {"a_log_delta": DeltaConfig(), "lora_x_proj": LoraConfig(rank=2)}],
                         ids=["alone", "stacked"])
def test_measured_count_equals_closed_form(tiny_lm, others):
    methods = {**others, "sdt": tiny_config()}
    applied = apply_methods(tiny_lm, methods)
    assert applied.num_params()["sdt"] == 2 * (C * S + 2 * N * C) == 120
    assert sum(p.numel() for p in tiny_lm.parameters() if p.requires_grad) == sum(
        count_params(methods, ModelDims.from_config(tiny_lm.config)).values())


def test_only_the_selected_entries_of_a_log_and_the_b_c_rows_change(tiny_lm):
    cfg = tiny_config()
    perturb(apply_methods(tiny_lm, {"sdt": cfg}))
    for mixer, layer in zip((m.mixer for m in tiny_lm.backbone.layers), cfg.selection, strict=True):
        a_changed = (mixer.A_log != mixer.parametrizations.A_log.original).detach()  # [E, N]
        expected = torch.zeros(E, N, dtype=torch.bool)
        for e, states in zip(layer.channels, layer.states, strict=True):
            expected[e, list(states)] = True
        assert torch.equal(a_changed, expected)
        x_changed = (mixer.x_proj.weight != mixer.x_proj.parametrizations.weight.original).detach()  # [R+2N, E]
        expected = torch.zeros(R + 2 * N, E, dtype=torch.bool)
        expected[R:, list(layer.channels)] = True  # B rows R..R+N-1 and C rows R+N..R+2N-1, kept columns
        assert torch.equal(x_changed, expected)


def test_every_trainable_tensor_gets_a_nonzero_gradient(tiny_lm, tiny_ids):
    applied = apply_methods(tiny_lm, {"sdt": tiny_config()})
    perturb(applied)
    tiny_lm.train()
    tiny_lm(tiny_ids).logits.square().mean().backward()
    trainable = [(n, p) for n, p in tiny_lm.named_parameters() if p.requires_grad]
    assert len(trainable) == 4  # per layer: the A_log delta [c, s] and the x_proj delta [2N, c]
    for name, p in trainable:
        assert p.grad is not None and (p.grad != 0).all(), f"{name} has a zero gradient entry"
    assert all(p.grad is None for p in tiny_lm.parameters() if not p.requires_grad)


def test_identity_at_init_and_output_changes_once_perturbed(tiny_lm, tiny_ids):
    before = logits(tiny_lm, tiny_ids)
    applied = apply_methods(tiny_lm, {"sdt": tiny_config()})
    assert torch.allclose(logits(tiny_lm, tiny_ids), before, rtol=1e-5, atol=1e-6)  # a zero delta, fp32
    perturb(applied)
    assert not torch.allclose(logits(tiny_lm, tiny_ids), before, atol=1e-6)


def test_merged_plain_checkpoint_reproduces_the_adapted_model(tiny_lm, tiny_ids, tmp_path):
    # Stacked on two other parametrisations of the same tensors, so merging folds the whole chain.
    perturb(apply_methods(tiny_lm, {"a_log_delta": DeltaConfig(), "lora_x_proj": LoraConfig(rank=2),
                                    "sdt": tiny_config()}))
    adapted = logits(tiny_lm, tiny_ids)
    merge_methods(tiny_lm)
    tiny_lm.save_pretrained(tmp_path)
    plain = MambaForCausalLM.from_pretrained(tmp_path).eval()
    assert not any("parametrizations" in n for n, _ in plain.named_parameters())
    merged = logits(plain, tiny_ids)
    assert ((merged - adapted).abs().max() / adapted.abs().max()) < 1e-5


def test_saved_adapters_with_their_selection_load_back_onto_a_fresh_base_model(tiny_lm, tiny_ids, tmp_path):
    tiny_lm.save_pretrained(tmp_path / "base")
    methods = {"sdt": tiny_config()}
    perturb(apply_methods(tiny_lm, methods))
    adapted = logits(tiny_lm, tiny_ids)
    save_adapters(tiny_lm, methods, tmp_path / "adapter")
    spec = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert len(spec["methods"]["sdt"]["selection"]) == 2
    fresh = MambaForCausalLM.from_pretrained(tmp_path / "base").eval()
    applied, _ = load_adapters(fresh, tmp_path / "adapter")
    assert applied.configs["sdt"] == methods["sdt"]
    assert torch.allclose(logits(fresh, tiny_ids), adapted, atol=1e-6)


def _layer(channels, states) -> SdtLayer:
    return SdtLayer(channels=channels, states=states)


GOOD = _layer((1, 2, 3, 4, 5, 6), ((0, 1),) * 6)
BAD = {
    "layers": ((GOOD,), r"selection has 1 layers, the model 2"),
    "channel count": ((GOOD, _layer((1, 2, 3, 4, 5), ((0, 1),) * 5)), r"selection layer 1: 5 channels, .* keeps 6"),
    "repeated channel": ((_layer((1, 1, 3, 4, 5, 6), ((0, 1),) * 6), GOOD), r"selection layer 0: repeated channel"),
    "channel range": ((GOOD, _layer((1, 2, 3, 4, 5, 64), ((0, 1),) * 6)), r"selection layer 1: channel outside 0..63"),
    "state lists": ((_layer((1, 2, 3, 4, 5, 6), ((0, 1),) * 5), GOOD), r"selection layer 0: 5 state lists"),
    "state count": ((GOOD, _layer((1, 2, 3, 4, 5, 6), ((0, 1),) * 5 + ((0, 1, 2),))),
                    r"selection layer 1: channel 6 has states \[0, 1, 2\]"),
    "state range": ((GOOD, _layer((1, 2, 3, 4, 5, 6), ((0, 1),) * 5 + ((0, 4),))),
                    r"selection layer 1: channel 6 has a state outside 0..3"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_selection_that_does_not_fit_the_model_is_refused_naming_the_layer(tiny_lm, case):
    selection, message = BAD[case]
    with pytest.raises(MethodError, match=message):
        apply_methods(tiny_lm, {"sdt": TINY.model_copy(update={"selection": selection})})


def test_a_good_selection_of_the_same_shape_is_accepted(tiny_lm):
    assert apply_methods(tiny_lm, {"sdt": TINY.model_copy(update={"selection": (GOOD, GOOD)})}).num_params()


def test_applying_without_a_selection_says_how_to_get_one(tiny_lm):
    with pytest.raises(MethodError, match=r"sdt: no selection; .*warmup_selection"):
        apply_methods(tiny_lm, {"sdt": SdtConfig()})


def test_selection_is_not_a_space_field_and_sampled_configs_have_none():
    space = SearchSpace.model_validate({"methods": {"sdt": {"enabled": True, "freeze_state": {"choices": [0.75, 0.9]},
                                                            "warmup_steps": 500}}})
    import optuna

    cfg = sample_trial(space, optuna.trial.FixedTrial({"sdt.freeze_state": 0.9}))
    assert cfg.methods["sdt"] == SdtConfig(freeze_state=0.9, warmup_steps=500)
    with pytest.raises(ValueError, match="selection"):
        SearchSpace.model_validate({"methods": {"sdt": {"selection": []}}})


def test_a_trial_runs_the_warm_up_and_carries_its_selection(monkeypatch):
    from trials.methods import sdt as sdt_module
    from trials.run import build_trial, expected_trainable, run_trial

    warmups = []
    real = sdt_module.warmup_selection
    monkeypatch.setattr("trials.methods.sdt.warmup_selection", lambda *a: warmups.append(1) or real(*a))
    cfg = TrialConfig.from_yaml(small_trial_yaml(
        methods="sdt: {warmup_steps: 3, freeze_channel: 0.9}\n  lora_out_proj: {rank: 2}", steps=3))
    built = build_trial(cfg)
    assert warmups == [1]
    resolved = built.applied.configs["sdt"]
    assert resolved.model_copy(update={"selection": None}) == cfg.methods["sdt"]
    # Embedded model: 4 layers, E=128, N=16. c = 128 - round(115.2) = 13, s = 16 - 12 = 4.
    assert len(resolved.selection) == 4 and all(len(layer.channels) == 13 for layer in resolved.selection)
    assert built.applied.num_params()["sdt"] == 4 * (13 * 4 + 2 * 16 * 13)
    dims = ModelDims.from_config(built.model.lm.config)
    assert built.trainable_params == expected_trainable(cfg, dims, built.data.num_classes)
    # Given its selection outright, the trial skips the warm-up and starts from the same state (same head init).
    given = cfg.model_copy(update={"methods": {**cfg.methods, "sdt": resolved}})
    again = build_trial(given)
    assert warmups == [1]
    assert torch.equal(again.model.head.weight, built.model.head.weight)
    result = run_trial(cfg, steps=3, built=built)
    assert result.method_params["sdt"] == 4 * (13 * 4 + 2 * 16 * 13)


def test_a_trained_sdt_trial_reloads_from_its_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trials import trained as train_module
    from trials.methods.api import adapter_state
    from trials.methods.sdt import SparseDelta
    from trials.run import evaluate

    builds = []  # the trial train() builds and trains, to compare the reloaded model with
    real = train_module.build_trial
    monkeypatch.setattr(train_module, "build_trial", lambda *a, **kw: builds.append(real(*a, **kw)) or builds[-1])
    cfg = TrialConfig.from_yaml(small_trial_yaml(methods="sdt: {warmup_steps: 2, freeze_channel: 0.9}", steps=2))
    metrics = train_module.train(cfg, tmp_path, steps=2, echo=lambda *_: None)
    (built,) = builds
    trained, data = built.model.eval(), built.data  # moved to the CPU by train()
    reloaded = train_module.load_trained(tmp_path)

    # The saved spec carries the warm-up's selection, and the reloaded SDT masks (index buffers) and deltas
    # are the saved ones.
    spec = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert SdtConfig.model_validate(spec["methods"]["sdt"]) == built.applied.configs["sdt"]
    saved = {k: v for k, v in load_file(str(tmp_path / "adapter" / "adapter.safetensors")).items()
             if not k.startswith("extra.")}
    for state in (adapter_state(trained.lm), adapter_state(reloaded.lm)):
        assert state.keys() == saved.keys()
        for name, tensor in saved.items():
            assert torch.equal(state[name], tensor), name  # stored tensors, copied bit for bit
    for i, (ours, theirs) in enumerate(zip(trained.lm.backbone.layers, reloaded.lm.backbone.layers, strict=True)):
        for owner, attr in (("", "A_log"), ("x_proj", "weight")):
            mine = ours.mixer.get_submodule(owner).parametrizations[attr][0]
            back = theirs.mixer.get_submodule(owner).parametrizations[attr][0]
            assert isinstance(back, SparseDelta), f"layer {i} {attr}"
            assert torch.equal(back.rows, mine.rows) and torch.equal(back.cols, mine.cols), f"layer {i} {attr}"

    # Same logits as the trained model (fp32, the same ops on the same tensors) and the accuracy it reported.
    ids, lengths = data.val.ids[:64], data.val.lengths[:64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, lengths), trained(ids, lengths), rtol=1e-5, atol=1e-6)
    assert evaluate(reloaded, data.val) == pytest.approx(metrics["val_accuracy"])
    assert metrics["merge_max_rel_error"] < 1e-5
