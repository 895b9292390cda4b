from __future__ import annotations

import optuna
import pytest

from space.config import SearchSpace, SpaceError, TrialConfig, load_space, replay_trial, sample_trial
from space.methods import METHOD_SPACES
from tests.conftest import REPO


def write(tmp_path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


def error_of(tmp_path, text: str) -> str:
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, text))
    return str(info.value)


def test_repository_default_space_is_valid():
    space = load_space(REPO / "space.yaml")
    assert space.model.checkpoint == "embedded"
    assert space.search.num_trials >= 12
    assert [o.metric for o in space.objectives] == ["val_accuracy", "trainable_params"]


def test_empty_file_gives_the_documented_defaults(tmp_path):
    space = load_space(write(tmp_path, ""))
    assert space == SearchSpace()


@pytest.mark.parametrize("text, expected", [
    ("methods: {lora_in_proj: {rank: 0}}", "space.yaml: methods.lora_in_proj.rank: 0 is below 1"),
    ("methods: {lora_in_proj: {rank: {low: 8, high: 2}}}", "methods.lora_in_proj.rank: low 8 is above high 2"),
    ("methods: {lora_in_proj: {rank: {choices: [2, 2.5]}}}", "methods.lora_in_proj.rank: choice 2.5 is not an int"),
    ("methods: {lora_in_proj: {rnk: 3}}", "methods.lora_in_proj.rnk: unknown key"),
    ("methods: {lora: {}}", "methods: unknown method 'lora'"),
    ("training: {learning_rate: {low: 0, high: 1, log: true}}", "training.learning_rate: a log range needs low > 0"),
    ("training: {stepz: 3}", "training.stepz: unknown key"),
    ("search: {num_trials: many}", "search.num_trials: Input should be a valid integer"),
    ("objectives: [{metric: test_accuracy}]", "test accuracy is reported, never optimised"),
    ("objectives: [{metric: val_accuracy, direction: min}]", "val_accuracy is to be maximised"),
    ("task: {name: csv}", "space.yaml: task: task 'csv' needs files.train"),
    ("training: {steps: 10, eval_every: 20}", "eval_every 20 is above training.steps 10"),
    ("- just\n- a list", "the top level must be a mapping"),
    ("model: [unclosed", "not valid YAML"),
])
def test_bad_space_is_rejected_naming_the_key_path(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "nope.yaml")


def test_every_method_space_has_a_config_with_the_same_fields():
    for name, (space_cls, config_cls) in METHOD_SPACES.items():
        learned = {"selection"} if name == "sdt" else set()  # SDT's warm-up fills it in; never searched
        assert set(space_cls.model_fields) - {"enabled"} == set(config_cls.model_fields) - learned, name


def test_sampled_params_replay_to_the_same_trial_config():
    space = load_space(REPO / "space.yaml")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(3))
    for _ in range(10):
        trial = study.ask()
        cfg = sample_trial(space, trial)
        assert replay_trial(space, trial.params) == cfg
        study.tell(trial, [0.5, 1.0])


def test_disabled_methods_are_never_sampled_and_enabled_ones_always_are():
    space = SearchSpace.model_validate({"methods": {"lora_in_proj": {"enabled": False},
                                                    "a_log_delta": {"enabled": True}}})
    cfg = sample_trial(space, optuna.trial.FixedTrial({}))
    assert set(cfg.methods) == {"a_log_delta"}


def test_searched_rank_takes_the_value_the_trial_suggests():
    space = SearchSpace.model_validate({"methods": {"lora_in_proj": {"enabled": True, "rank": {"choices": [2, 8]}}}})
    cfg = replay_trial(space, {"lora_in_proj.rank": 8})
    assert cfg.methods["lora_in_proj"].rank == 8


def test_replay_with_missing_params_fails_loudly():
    space = SearchSpace.model_validate({"methods": {"lora_in_proj": {"enabled": "search"}}})
    with pytest.raises(ValueError):
        replay_trial(space, {})


def test_trial_config_round_trips_through_yaml():
    space = load_space(REPO / "space.yaml")
    cfg = replay_trial(space, {"lora_in_proj.enabled": True, "lora_in_proj.rank": 4, "lora_in_proj.scale": 0.5,
                               "lora_in_proj.lr_mult": 1.0, "a_log_delta.enabled": False,
                               "training.learning_rate": 0.004})
    again = TrialConfig.from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.methods["lora_in_proj"].rank == 4


def test_bad_trial_config_names_the_file_and_key():
    with pytest.raises(SpaceError, match=r"best.yaml: methods: unknown method 'nope'"):
        TrialConfig.from_yaml("model: {}\ntask: {}\nmethods: {nope: {}}\ntraining: {}\n", where="best.yaml")


def test_example_spaces_are_valid_and_sample_every_method():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        space = load_space(path)
        params = {f"{name}.enabled": True for name in space.methods}
        params.update({"lora_in_proj.dora": True, "training.learning_rate": 0.003,
                       "prompt_tuning.position": "prefix_suffix"})
        cfg = replay_trial(space, params)
        assert set(cfg.methods) == {n for n, m in space.methods.items() if m.enabled is not False}, path.name
        assert cfg.methods["lora_in_proj"].dora is True


def test_the_stage1_example_lists_every_registered_method():
    from trials.methods import REGISTRY

    assert set(load_space(REPO / "examples" / "stage1-all-methods.yaml").methods) == set(REGISTRY)


def test_a_searched_boolean_rejects_non_booleans(tmp_path):
    text = "methods: {lora_in_proj: {dora: maybe}}"
    assert "methods.lora_in_proj.dora: expected true, false or a mapping with 'choices'" in error_of(tmp_path, text)

