"""training.precision: a constant or a searched choice of fp32 / bf16 / fp16, validated on load."""

from __future__ import annotations

import optuna
import pytest

from space.config import SearchSpace, SpaceError, TrialConfig, load_space, replay_trial, sample_trial


def space_of(tmp_path, text: str) -> SearchSpace:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path)


def test_precision_defaults_to_fp32_in_the_space_and_the_trial_config():
    assert SearchSpace().training.precision == "fp32"
    assert sample_trial(SearchSpace(), optuna.trial.FixedTrial({})).training.precision == "fp32"


def test_a_constant_precision_reaches_the_trial_without_being_searched(tmp_path):
    space = space_of(tmp_path, "training: {precision: bf16}")
    cfg = replay_trial(space, {})  # FixedTrial({}) fails on any suggest_* call
    assert cfg.training.precision == "bf16"


def test_a_searched_precision_takes_the_value_the_trial_suggests(tmp_path):
    space = space_of(tmp_path, "training: {precision: {choices: [fp32, bf16]}}")
    assert replay_trial(space, {"training.precision": "bf16"}).training.precision == "bf16"
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        cfg = sample_trial(space, trial)
        assert trial.params["training.precision"] == cfg.training.precision
        assert replay_trial(space, trial.params) == cfg
        seen.add(cfg.training.precision)
        study.tell(trial, [0.5, 1.0])
    assert seen == {"fp32", "bf16"}


@pytest.mark.parametrize("value, expected", [
    ("fp8", "space.yaml: training.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("{choices: [fp32, fp8]}", "space.yaml: training.precision: choice 'fp8' is not one of fp32, bf16, fp16"),
    ("16", "space.yaml: training.precision: expected a string or a mapping with 'choices', got 16"),
    ("{low: 16, high: 32}", "space.yaml: training.precision: a searched string needs 'choices'"),
    ("{choices: []}", "space.yaml: training.precision.choices:"),
])
def test_a_bad_precision_is_rejected_naming_the_key_and_value(tmp_path, value, expected):
    with pytest.raises(SpaceError) as info:
        space_of(tmp_path, f"training: {{precision: {value}}}")
    assert expected in str(info.value)


def test_precision_round_trips_through_the_trial_config_yaml_and_is_validated_there():
    cfg = TrialConfig.from_yaml("model: {}\ntask: {}\ntraining: {precision: fp16}\n")
    assert TrialConfig.from_yaml(cfg.to_yaml()) == cfg and cfg.training.precision == "fp16"
    with pytest.raises(SpaceError, match=r"best.yaml: training.precision: .*'fp8'"):
        TrialConfig.from_yaml("model: {}\ntask: {}\ntraining: {precision: fp8}\n", where="best.yaml")
