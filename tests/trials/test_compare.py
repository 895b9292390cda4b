"""trials.compare and trials.run: each arm's learning rate is chosen on validation alone, every baseline trains
the parameters it claims, and a comparison runs end to end for a classification and a causal_lm task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from space.config import TrialConfig
from trials.compare import DEFAULT_ARMS, Cell, Run, choose_lr, compare, main, markdown, table
from trials.models.loading import load_base_model
from trials.run import BASELINES, build_trial
from trials.tasks.registry import load_task

EMBEDDED_LM_PARAMS = 149_312  # the embedded checkpoint, its tied lm_head/embedding (288 x 64) counted once
DIGITS_HEAD = 64 * 10 + 10


def _cell(lr: float, val: list[float], test: list[float], metric: str = "accuracy", error: bool = False) -> Cell:
    runs = [Run(seed, {f"val_{metric}": v, f"test_{metric}": t}, 1, 0.0)
            for seed, (v, t) in enumerate(zip(val, test, strict=True))]
    if error:
        runs[-1] = Run(len(runs) - 1, {}, 1, math.nan, error="loss is nan at step 3")
    return Cell(lr, runs)


def test_learning_rate_with_the_best_mean_validation_accuracy_is_chosen_whatever_the_test_says():
    grid = [_cell(1e-3, val=[0.50, 0.60], test=[0.95, 0.95]),
            _cell(3e-3, val=[0.70, 0.62], test=[0.10, 0.10]),  # best mean (0.66), worst test
            _cell(1e-2, val=[0.90, 0.30], test=[0.90, 0.90])]  # best single seed, mean 0.60
    assert choose_lr(grid, "val_accuracy") == 3e-3


def test_learning_rate_with_the_lowest_mean_validation_loss_is_chosen_whatever_the_test_says():
    grid = [_cell(1e-3, val=[2.0, 2.2], test=[0.1, 0.1], metric="loss"),
            _cell(3e-3, val=[1.5, 1.9], test=[9.0, 9.0], metric="loss"),  # lowest mean (1.7), worst test
            _cell(1e-2, val=[1.0, 2.6], test=[0.1, 0.1], metric="loss")]  # lowest single seed, mean 1.8
    assert choose_lr(grid, "val_loss") == 3e-3


def test_a_test_metric_never_chooses_a_learning_rate():
    with pytest.raises(ValueError, match="'test_accuracy' is not a validation metric"):
        choose_lr([_cell(1e-3, [0.5], [0.5])], "test_accuracy")


def test_a_rate_at_which_a_seed_diverged_is_not_chosen_and_ties_go_to_the_first_rate():
    diverged = _cell(1e-2, val=[0.99, 0.99], test=[0.0, 0.0], error=True)
    assert choose_lr([_cell(1e-3, [0.5, 0.5], [0, 0]), diverged, _cell(3e-3, [0.5, 0.5], [0, 0])],
                     "val_accuracy") == 1e-3
    assert choose_lr([diverged], "val_accuracy") is None


@pytest.fixture
def one_thread():
    """The embedded model gains nothing from a second intra-op thread, and on a busy machine two threads contend:
    a comparison test ran 6x slower and a training step 8x, measured while a benchmark held both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_cfg() -> TrialConfig:
    return TrialConfig.from_yaml("""
model: {checkpoint: embedded}
task: {name: digits, shots_per_class: 2}
methods: {lora_in_proj: {rank: 2}, a_log_delta: {}}
training: {rungs: [3], batch_size: 8}
seed: 0
""")


@pytest.fixture(scope="module")
def digits(digits_cfg):
    return load_task(digits_cfg.task, digits_cfg.model)


def test_full_fine_tuning_trains_every_parameter_of_the_pretrained_checkpoint(digits_cfg, digits):
    built = build_trial(digits_cfg.model_copy(update={"baseline": "full"}), digits)
    assert all(p.requires_grad for p in built.model.parameters())
    assert built.trainable_params == built.total_params == EMBEDDED_LM_PARAMS + DIGITS_HEAD
    lm = built.model.lm
    assert lm.lm_head.weight is lm.backbone.embeddings.weight  # tied: one tensor, counted once above
    reference = load_base_model("embedded")
    assert all(p.equal(reference.state_dict()[n]) for n, p in lm.named_parameters())  # pretrained weights


def test_head_baseline_trains_only_the_head(digits_cfg, digits):
    built = build_trial(digits_cfg.model_copy(update={"baseline": "head"}), digits)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    assert built.trainable_params == DIGITS_HEAD and built.total_params == EMBEDDED_LM_PARAMS + DIGITS_HEAD


def test_scratch_baseline_is_the_architecture_with_fresh_weights_all_trainable(digits_cfg, digits):
    built = build_trial(digits_cfg.model_copy(update={"baseline": "scratch"}), digits)
    assert all(p.requires_grad for p in built.model.parameters())
    assert built.trainable_params == built.total_params == EMBEDDED_LM_PARAMS + DIGITS_HEAD
    pretrained = load_base_model("embedded").state_dict()
    differs = {n: not p.equal(pretrained[n]) for n, p in built.model.lm.named_parameters()}
    assert all(differs.values()), [n for n, d in differs.items() if not d]


def test_unknown_baseline_is_an_error_naming_the_choices(digits_cfg, digits):
    with pytest.raises(ValueError, match="baseline 'lora' is not one of full, head, scratch"):
        build_trial(digits_cfg.model_copy(update={"baseline": "lora"}), digits)
    assert BASELINES == ("full", "head", "scratch")


def test_digits_comparison_chooses_one_rate_per_arm_from_its_grid(digits_cfg, one_thread):
    lrs = {"peft": [1e-3, 1e-2], "head": [1e-3, 1e-2], "full": [3e-4, 3e-3], "scratch": [3e-4, 3e-3]}
    comp = compare(digits_cfg, lrs=lrs, seeds=[0], echo=lambda _: None)
    assert [a.arm for a in comp.arms] == list(DEFAULT_ARMS)
    assert comp.metric == "val_accuracy" and comp.test_metric == "test_accuracy" and comp.steps == 3
    for arm in comp.arms:
        assert arm.trained and arm.chosen_lr in lrs[arm.arm]
        assert [c.lr for c in arm.grid] == lrs[arm.arm] and all(len(c.runs) == 1 for c in arm.grid)
        assert arm.chosen_lr == max(arm.grid, key=lambda c: c.mean_std("val_accuracy")[0]).lr
    counts = {a.arm: a.trainable_params for a in comp.arms}
    assert counts["full"] == counts["scratch"] == EMBEDDED_LM_PARAMS + DIGITS_HEAD
    assert counts["head"] == DIGITS_HEAD and counts["peft"] == 4 * 2 * (64 + 256) + 4 * 128 * 16 + DIGITS_HEAD
    assert "<- chosen" in table(comp) and markdown(comp).count("\n") == 1 + len(comp.arms)
    json.dumps(comp.to_json(digits_cfg), allow_nan=False)


def test_causal_lm_comparison_chooses_on_validation_loss_and_measures_the_untrained_base_model(one_thread):
    cfg = TrialConfig.from_yaml("""
model: {checkpoint: embedded}
task: {name: stdlib_docstrings, max_length: 32}
methods: {lora_in_proj: {rank: 2}}
training: {rungs: [2], batch_size: 8}
""")
    comp = compare(cfg, arms=["peft", "full", "head"], lrs={"peft": [1e-3, 1e-2], "full": [1e-4, 3e-3]},
                   seeds=[0], echo=lambda _: None)
    assert comp.metric == "val_loss" and comp.test_metric == "test_loss"
    peft, full, head = comp.arms
    for arm in (peft, full):
        assert arm.chosen_lr == min(arm.grid, key=lambda c: c.mean_std("val_loss")[0]).lr  # lower is better
    assert full.trainable_params == EMBEDDED_LM_PARAMS
    assert not head.trained and head.chosen_lr is None and head.trainable_params == 0  # no head: nothing trains
    untrained = head.grid[0].runs[0]
    assert untrained.train_seconds == 0.0 and math.isfinite(untrained.scores["val_loss"])
    assert "| base model, untrained | 0 | untrained |" in markdown(comp)
    json.dumps(comp.to_json(cfg), allow_nan=False)  # the untrained run's nan train loss is written as null


def test_cli_writes_json_and_markdown(tmp_path, capsys, one_thread):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {checkpoint: embedded}\ntask: {name: digits, shots_per_class: 1}\n"
                   "training: {rungs: [1], batch_size: 4}\n")
    assert main([str(cfg), "--arms", "head", "--lrs", "1e-3", "--seeds", "0", "--json", str(tmp_path / "o.json"),
                 "--markdown"]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["metric"] == "val_accuracy" and out["direction"] == "max"
    assert out["arms"][0]["chosen_lr"] == 1e-3 and out["arms"][0]["grid"][0]["runs"][0]["seed"] == 0
    assert "| head only | 650 | 1e-3 |" in capsys.readouterr().out


def test_a_bad_config_file_is_an_error_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {checkpoint: embedded}\ntask: {name: digits}\ntraining: {batch_size: 0}\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "batch_size" in err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_a_baseline_config_has_no_peft_arm(tmp_path, capsys):
    cfg = tmp_path / "full.yaml"
    cfg.write_text("model: {checkpoint: embedded}\ntask: {name: digits}\nbaseline: full\n")
    assert main([str(cfg)]) == 2
    assert "the config is the full baseline, not a PEFT configuration" in capsys.readouterr().err


def test_scratch_weights_are_fixed_by_the_trial_seed_alone(digits_cfg, digits):
    torch.manual_seed(123)
    a = build_trial(digits_cfg.model_copy(update={"baseline": "scratch"}), digits)
    torch.manual_seed(456)
    b = build_trial(digits_cfg.model_copy(update={"baseline": "scratch"}), digits)
    assert all(p.equal(q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))
