from __future__ import annotations

import optuna
import pytest

from space.config import SearchSpace, SpaceError, TrialConfig, dimensions, load_space, replay_trial, sample_trial
from space.methods import METHOD_SPACES
from space.params import Choices
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
    assert space.model.checkpoint == "embedded-tiny"  # make run: the small default takes ~20 min (README)
    assert space.search.num_trials >= 12
    assert [o.metric for o in space.objectives] == ["val_accuracy", "trainable_params"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}"])
def test_an_empty_space_is_an_error(tmp_path, text):
    assert "the space is empty" in error_of(tmp_path, text)


def test_a_space_with_only_a_name_has_the_documented_defaults(tmp_path):
    space = load_space(write(tmp_path, "name: search"))
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
    ("training: {steps: 120}", "training.steps: was replaced by training.budget.max_steps"),
    ("training: {final_steps: 400}", "training.final_steps: was replaced by training.budget.max_steps"),
    ("training: {eval_every: 30}", "training.eval_every: was replaced by training.budget.min_steps"),
    ("search: {early_stopping: {enabled: true}}", "search.early_stopping: was replaced by search.pruner"),
    ("training: {budget: {min_steps: 100, max_steps: 50}}", "training.budget.min_steps: 100 is above max_steps 50"),
    ("training: {budget: {max_steps: 50, rungs: [10, 40]}}", "the last rung 40 must be max_steps 50"),
    ("training: {budget: {max_steps: 50, rungs: [30, 10, 50]}}", "must be distinct positive steps in increasing"),
    ("search: {pruner: asha}", "search.pruner.name: Input should be 'pareto', 'median'"),
    ("search: {sampler: cmaes}", "search.sampler: Input should be 'tpe', 'nsga2', 'gp', 'random' or 'grid'"),
    ("search: {time_budget: soon}", "search.time_budget: 'soon' is not a duration"),
    ("search: {time_budget: -5}", "search.time_budget: -5 is not a positive duration"),
    ("search: {max_trainable: 0}", "search.max_trainable: 0 is neither a parameter count"),
    ("search: {max_trainable: '150%'}", "search.max_trainable: '150%': a percentage must be above 0"),
    ("search: {strategy: two_stage, num_trials: 8, stage1_trials: 8}", "stage1_trials: 8 leaves no trial"),
    ("search: {stage1_trials: 4}", "search.stage1_trials: only with strategy two_stage"),
    ("methods: {lora_in_proj: {enabled: search}}\nsearch: {enqueue: [{lora_in_proj.rnk: 2}]}",
     "search.enqueue.0: 'lora_in_proj.rnk' is not a searched parameter"),
    ("methods: {lora_in_proj: {enabled: search, scale: {low: 0.1, high: 1.0}}}\nsearch: {sampler: grid}",
     "search.sampler: grid needs every searched value to be a list of choices; lora_in_proj.scale is a range"),
    ("objectives: [{metric: trainable_params}]", "objectives: objectives ['trainable_params'] name no metric"),
    ("model: {pooling: {choices: [last, max]}}", "model.pooling: choice 'max' is not one of last, mean"),
    ("search: {pruner: {name: median, min_better: 3}}",
     "search.pruner.min_better: the median pruner does not use it (it takes min_peers, warmup_steps)"),
    ("methods: {lora_in_proj: {enabled: search}}\nsearch: {sampler: grid, strategy: two_stage}",
     "search.sampler: grid cannot run strategy two_stage"),
    ("methods: {lora_in_proj: {enabled: search}}\nsearch: {strategy: two_stage, enqueue: [{lora_in_proj.enabled: "
     "true}]}", "search.enqueue: not with strategy two_stage"),
    ("methods: {lora_in_proj: {enabled: search, rank: {choices: [1, 2]}}}\n"
     "search: {enqueue: [{lora_in_proj.enabled: true, lora_in_proj.rank: 99}]}",
     "search.enqueue.0.lora_in_proj.rank: 99 is not one of [1, 2]"),
    ("methods: {lora_in_proj: {enabled: search, rank: {choices: [1, 2]}}}\n"
     "search: {enqueue: [{lora_in_proj.rank: 2}]}",
     "search.enqueue.0: gives lora_in_proj.rank but not lora_in_proj.enabled (searched)"),
    ("training: {learning_rate: {low: 0.001, high: 0.01}}\nsearch: {enqueue: [{training.learning_rate: 0.5}]}",
     "search.enqueue.0.training.learning_rate: 0.5 is outside [0.001, 0.01]"),
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
                               "training.learning_rate": 0.004, "model.pooling": "mean"})
    again = TrialConfig.from_yaml(cfg.to_yaml())
    assert again == cfg
    assert again.methods["lora_in_proj"].rank == 4 and again.model.pooling == "mean"
    assert again.training.rungs == space.training.budget.steps()


def test_bad_trial_config_names_the_file_and_key():
    with pytest.raises(SpaceError, match=r"best.yaml: methods: unknown method 'nope'"):
        TrialConfig.from_yaml("model: {}\ntask: {}\nmethods: {nope: {}}\ntraining: {}\n", where="best.yaml")


def test_example_spaces_are_valid_and_sample_every_method():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        space = load_space(path)
        params = {f"{name}.enabled": True for name in space.methods}
        params.update({"training.learning_rate": 0.003, "prompt_tuning.position": "prefix_suffix",
                       "model.pooling": "mean"})
        searched_dora = isinstance(getattr(space.methods.get("lora_in_proj"), "dora", None), Choices)
        if searched_dora:
            params["lora_in_proj.dora"] = True
        cfg = replay_trial(space, params)
        assert set(cfg.methods) == {n for n, m in space.methods.items() if m.enabled is not False}, path.name
        if searched_dora:
            assert cfg.methods["lora_in_proj"].dora is True, path.name


def test_the_stage1_example_lists_every_registered_method():
    from trials.methods import REGISTRY
    from trials.methods.registry import supported

    on_mamba1 = {name for name in REGISTRY if supported(name, "mamba") is None}
    assert set(load_space(REPO / "examples" / "stage1-all-methods.yaml").methods) == on_mamba1


def test_a_searched_boolean_rejects_non_booleans(tmp_path):
    text = "methods: {lora_in_proj: {dora: maybe}}"
    assert "methods.lora_in_proj.dora: expected true, false or a mapping with 'choices'" in error_of(tmp_path, text)



def test_an_old_trial_config_is_refused_naming_the_new_key():
    with pytest.raises(SpaceError, match=r"best.yaml: training.final_steps: was replaced by training.budget"):
        TrialConfig.from_yaml("model: {}\ntask: {}\ntraining: {final_steps: 400}\n", where="best.yaml")


@pytest.mark.parametrize(("budget", "rungs"), [
    ({"min_steps": 60, "max_steps": 480}, [60, 120, 240, 480]),
    ({"min_steps": 50, "max_steps": 480, "reduction_factor": 3}, [50, 150, 450, 480]),
    ({"min_steps": 480, "max_steps": 480}, [480]),
    ({"max_steps": 90, "rungs": [10, 30, 90]}, [10, 30, 90]),
])
def test_budget_rungs_are_geometric_and_end_at_the_maximum(budget, rungs):
    space = SearchSpace.model_validate({"training": {"budget": budget}})
    assert space.training.budget.steps() == rungs
    assert sample_trial(space, optuna.trial.FixedTrial({})).training.rungs == rungs


def test_pooling_is_searched_like_a_learning_rate():
    space = SearchSpace.model_validate({"model": {"pooling": {"choices": ["last", "mean"]}}})
    assert replay_trial(space, {"model.pooling": "mean"}).model.pooling == "mean"
    assert "model.pooling" in dimensions(space)


def test_dimensions_lists_every_searched_parameter_of_every_method_that_may_be_on():
    space = SearchSpace.model_validate({"methods": {
        "lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2]}, "scale": 0.5},
        "a_log_delta": {"enabled": True, "lr_mult": {"low": 0.1, "high": 1.0, "log": True}},
        "d_delta": {"enabled": False, "lr_mult": {"low": 0.1, "high": 1.0}}},
        "training": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}})
    assert set(dimensions(space)) == {"lora_in_proj.enabled", "lora_in_proj.rank", "a_log_delta.lr_mult",
                                      "training.learning_rate"}


def test_time_budget_and_max_trainable_accept_units():
    s = SearchSpace.model_validate({"search": {"time_budget": "1.5h", "max_trainable": "2%"}}).search
    assert s.time_budget == 5400 and s.max_trainable == "2.0%"
    plain = SearchSpace.model_validate({"search": {"time_budget": 90, "max_trainable": 5000}}).search
    assert plain.time_budget == 90 and plain.max_trainable == 5000


def test_stage1_pins_sizes_to_the_smallest_and_searches_only_the_switches():
    from space.stages import stage1_space

    space = SearchSpace.model_validate({"methods": {
        "lora_in_proj": {"enabled": True, "rank": {"choices": [8, 2, 4]}, "scale": {"low": 0.1, "high": 1.6,
                                                                                   "log": True}},
        "a_log_delta": {"enabled": "search"}, "d_delta": {"enabled": False}},
        "training": {"learning_rate": {"low": 1e-3, "high": 1e-2}}})
    stage1 = stage1_space(space)
    assert set(dimensions(stage1)) == {"lora_in_proj.enabled", "a_log_delta.enabled"}
    assert stage1.methods["lora_in_proj"].rank == 2 and abs(stage1.methods["lora_in_proj"].scale - 0.4) < 1e-9
    assert abs(stage1.training.learning_rate - 5.5e-3) < 1e-12
    assert "d_delta" not in stage1.methods


def test_relative_data_checkpoint_and_tokenizer_paths_become_absolute_against_the_directory_of_the_command(
        tmp_path, monkeypatch):
    from space.config import with_local_paths

    (tmp_path / "data").mkdir()
    (tmp_path / "ckpt").mkdir()
    space = SearchSpace.model_validate({
        "model": {"checkpoint": "ckpt", "tokenizer": "ckpt"},
        "task": {"name": "csv", "files": {"train": "data/train.csv", "validation": "/abs/val.csv"}}})
    out = with_local_paths(space, tmp_path)
    assert out.task.files == {"train": str(tmp_path / "data" / "train.csv"), "validation": "/abs/val.csv"}
    assert out.model.checkpoint == out.model.tokenizer == str(tmp_path / "ckpt")
    hub = SearchSpace.model_validate({"model": {"checkpoint": "state-spaces/mamba-130m-hf"}})
    assert with_local_paths(hub, tmp_path).model.checkpoint == "state-spaces/mamba-130m-hf"  # not here: a hub id
    assert with_local_paths(SearchSpace(), tmp_path).model.checkpoint == "embedded"
    monkeypatch.setenv("HOME", str(tmp_path))
    home = SearchSpace.model_validate({"model": {"checkpoint": "~/ckpt"}})
    assert with_local_paths(home, tmp_path / "data").model.checkpoint == str(tmp_path / "ckpt")  # ~ expanded
