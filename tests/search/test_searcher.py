"""The searcher's phases and decisions, driven by hand as Ray would drive it: no Ray processes, in-memory Optuna."""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.hypervolume import search_hypervolume
from search.pruners import RUNG_ATTR
from search.searcher import STATE_ATTR, PeftSearcher, make_sampler
from space.config import SearchSpace, TrialConfig, sample_trial
from space.stages import DROP
from tests.conftest import REPO
from trials.report import FINISHED


def make_space(extra: dict | None = None, methods: dict | None = None) -> SearchSpace:
    data = {
        "model": {"checkpoint": "embedded"},
        "task": {"name": "digits", "shots_per_class": 2},
        "methods": methods or {"lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2]}},
                               "a_log_delta": {"enabled": "search"}},
        "training": {"budget": {"min_steps": 2, "max_steps": 8, "reduction_factor": 2}},
        "search": {"num_trials": 6, "sampler": "random", "reevaluate": {"top": 0}},
    }
    for key, value in (extra or {}).items():
        data[key] = {**data.get(key, {}), **value}
    return SearchSpace.model_validate(data)


class Sizes:
    """Closed form stand-in: the head (650) plus 1,000 per method and 500 per rank unit."""

    def trainable(self, cfg: TrialConfig) -> int:
        return 650 + sum(1000 + 500 * getattr(m, "rank", 0) for m in cfg.methods.values())


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str, str, str]] = []
        self.volumes: list[tuple[int, float]] = []

    def settled(self, number, phase, cfg, params, state, metrics, note) -> None:
        self.calls.append((number, phase, state, note))

    def hypervolume(self, completed: int, value: float) -> None:
        self.volumes.append((completed, value))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def searcher_for(space: SearchSpace, limit: int | None = None, clock=None) -> tuple[PeftSearcher, Recorder]:
    recorder = Recorder()
    s = PeftSearcher(space, optuna.storages.InMemoryStorage(), "s", Sizes(), limit, 100_000, recorder,
                     echo=lambda line: None, **({"clock": clock} if clock else {}))
    return s, recorder


def finish(s: PeftSearcher, tid: str, accuracy: float) -> None:
    size = s.live[tid].size
    s.on_trial_complete(tid, result={FINISHED: True, "val_accuracy": accuracy, "trainable_params": size,
                                     "test_accuracy": accuracy - 0.01, "step": 8})


def states(s: PeftSearcher, phase: int = 0) -> list[str]:
    study = s.phases[phase].study
    assert study is not None
    return [t.user_attrs.get(STATE_ATTR) for t in study.trials]


def test_a_configuration_that_finished_is_never_trained_again():
    # One configuration only: the one searched dimension has a single choice.
    space = make_space(methods={"lora_in_proj": {"enabled": True, "rank": {"choices": [1]}}})
    s, rec = searcher_for(space)
    first = s.suggest("t1")
    assert isinstance(first, dict)
    finish(s, "t1", 0.5)
    assert s.suggest("t2") == Searcher.FINISHED  # every later proposal is the same configuration: settled
    assert [state for _, _, state, _ in rec.calls] == ["duplicate"] * 5
    study = s.phases[0].study
    assert study is not None
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert all(t.values == [0.5, first["trainable_params"]] for t in study.trials)
    assert "same configuration as trial-001" in rec.calls[0][3]


def test_a_duplicate_of_a_failed_trial_is_trained():
    s, rec = searcher_for(make_space(methods={"lora_in_proj": {"enabled": True, "rank": {"choices": [1]}}}))
    assert isinstance(s.suggest("t1"), dict)
    s.on_trial_complete("t1", error=True)
    assert isinstance(s.suggest("t2"), dict)  # the same configuration, trained: its first try failed
    assert rec.calls == []
    assert states(s)[:2] == ["failed", "running"]


def test_configurations_above_max_trainable_are_rejected_before_training_and_told_to_the_sampler():
    space = make_space(methods={"lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2]}}})
    s, rec = searcher_for(space, limit=2000)  # head 650 + LoRA r1 1,500 = 2,150: every LoRA trial is too large
    launched = []
    for i in range(6):
        config = s.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        if isinstance(config, dict):
            launched.append(TrialConfig.model_validate_json(config["trial"]))
            finish(s, f"t{i}", 0.3)
    assert all(not cfg.methods for cfg in launched)  # only head-only configurations reached Ray
    study = s.phases[0].study
    rejected = [t for t in study.trials if t.user_attrs.get(STATE_ATTR) == "rejected"]
    # Complete with the worst accuracy and a violated constraint: infeasible for TPE, NSGA-II and GP alike.
    assert rejected and all(t.state == TrialState.COMPLETE and t.values[0] == 0.0 for t in rejected)
    assert all(t.constraints["max_trainable"] > 0 for t in rejected)
    assert not {t.number for t in study.best_trials} & {t.number for t in rejected}
    assert {note.split(" trainable")[0] for *_, note in rec.calls if "above" in note} <= {"2,150", "2,650"}


def test_rung_values_reach_the_study_and_its_pruner_stops_a_trial():
    space = make_space({"search": {"pruner": {"name": "pareto", "min_peers": 2, "min_better": 1, "margin": 0.05},
                                   "concurrency": 6}})
    s, _ = searcher_for(space)
    ids = [tid for tid in ("a", "b") if isinstance(s.suggest(tid), dict)]
    assert ids == ["a", "b"]
    small, large = sorted(ids, key=lambda t: s.live[t].size)
    assert not s.rung(small, {"step": 2, "val_accuracy": 0.6, FINISHED: False})
    assert s.rung(large, {"step": 2, "val_accuracy": 0.3, FINISHED: False})  # a no-larger trial: 0.3 better
    study = s.phases[0].study
    frozen = {t.user_attrs["mps_number"]: t for t in study.trials}
    assert frozen[s.live[large].number].user_attrs[RUNG_ATTR] == {"2": 0.3}
    s.on_trial_complete(large, result={"step": 2, "val_accuracy": 0.3, FINISHED: False})
    assert s.state_of(large) == "pruned"
    assert s.steps_saved == 8 - 2
    pruned_trial = [t for t in study.trials if t.user_attrs.get(STATE_ATTR) == "pruned"]
    assert len(pruned_trial) == 1 and pruned_trial[0].state == TrialState.PRUNED


def test_a_trial_stopped_without_a_pruning_decision_is_interrupted_not_complete():
    s, _ = searcher_for(make_space())
    s.suggest("t1")
    s.on_trial_complete("t1", result={"val_accuracy": 0.99, "trainable_params": 1, FINISHED: False, "step": 2})
    assert states(s)[0] == "interrupted"
    assert s.phases[0].study.trials[0].state == TrialState.FAIL


def test_two_stage_hands_the_methods_of_the_most_accurate_stage1_trial_to_stage2():
    methods = {"lora_in_proj": {"enabled": "search", "rank": {"choices": [2, 4]}},
               "a_log_delta": {"enabled": "search"}, "d_delta": {"enabled": "search"}}
    space = make_space({"search": {"strategy": "two_stage", "num_trials": 10, "stage1_trials": 4,
                                   "concurrency": 10}}, methods=methods)
    s, _ = searcher_for(space)
    configs = {}
    for i in range(4):
        config = s.suggest(f"s1-{i}")
        if isinstance(config, dict):
            configs[f"s1-{i}"] = TrialConfig.model_validate_json(config["trial"])
    assert all(cfg.methods.get("lora_in_proj", None) is None or cfg.methods["lora_in_proj"].rank == 2
               for cfg in configs.values())  # stage 1: the smallest size
    assert s.suggest("wait") is None  # stage 2 needs stage 1's results
    best = max(configs, key=lambda t: (len(configs[t].methods), t))
    for tid in configs:
        finish(s, tid, 0.9 if tid == best else 0.2)
    chosen = set(configs[best].methods)
    seen_drop = set()
    for i in range(6):
        config = s.suggest(f"s2-{i}")
        if config == Searcher.FINISHED:
            break
        if isinstance(config, dict):
            assert config["phase"] == "stage2"
            cfg = TrialConfig.model_validate_json(config["trial"])
            assert set(cfg.methods) <= chosen and len(chosen - set(cfg.methods)) <= 1  # may drop one
            seen_drop.add(config["params"].get(DROP, "none"))
            finish(s, f"s2-{i}", 0.5)
    assert s.stage1_selection == list(configs[best].methods)
    assert s.phases[1].study is not None and s.phases[1].study.study_name == "s-stage2"


def test_reevaluation_trains_the_top_front_configurations_with_new_seeds():
    space = make_space({"search": {"num_trials": 3, "reevaluate": {"top": 2, "seeds": 2}, "concurrency": 3}})
    s, _ = searcher_for(space)
    launched = {}
    for i in range(3):
        config = s.suggest(f"t{i}")
        if isinstance(config, dict):
            launched[f"t{i}"] = config
    for i, tid in enumerate(launched):
        finish(s, tid, 0.4 + 0.1 * i)
    again = []
    while (config := s.suggest(f"r{len(again)}")) not in (None, Searcher.FINISHED):
        again.append(config)
        finish(s, f"r{len(again) - 1}", 0.5)
    front = {row["number"] for row in s._front()[:2]}
    assert {c["reevaluates"] for c in again} == front
    assert sorted(TrialConfig.model_validate_json(c["trial"]).seed for c in again) == [1, 1, 2, 2][: len(again)]
    assert all(c["phase"] == "reevaluate" and c["params"] == {} for c in again)
    assert s.suggest("end") == Searcher.FINISHED


def test_the_time_budget_stops_starting_trials_and_says_why():
    clock = Clock()
    s, _ = searcher_for(make_space({"search": {"time_budget": "10m"}}), clock=clock)
    assert isinstance(s.suggest("t1"), dict)
    clock.now = 400.0
    finish(s, "t1", 0.5)  # a trial takes 400 s; 400 + 400 > 600
    assert s.suggest("t2") == Searcher.FINISHED
    assert s.stop_reason is not None and "time budget 600 s" in s.stop_reason


def test_enqueued_configurations_are_evaluated_first():
    enqueue = [{"lora_in_proj.enabled": True, "lora_in_proj.rank": 2, "a_log_delta.enabled": False}]
    s, _ = searcher_for(make_space({"search": {"enqueue": enqueue, "sampler": "tpe"}}))
    config = s.suggest("t1")
    assert isinstance(config, dict)
    cfg = TrialConfig.model_validate_json(config["trial"])
    assert set(cfg.methods) == {"lora_in_proj"} and cfg.methods["lora_in_proj"].rank == 2


@pytest.mark.parametrize(("name", "cls"), [("tpe", "TPESampler"), ("nsga2", "NSGAIISampler"),
                                            ("gp", "GPSampler"), ("random", "RandomSampler"),
                                            ("grid", "OpenGridSampler")])
def test_every_sampler_is_built_and_seeded(name, cls):
    space = make_space({"search": {"sampler": name}, "training": {"learning_rate": 0.003}})
    sampler = make_sampler(space, seed=3)
    assert type(sampler).__name__ == cls
    drawn = []
    for _ in range(2):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(space, seed=3))
        drawn.append([sample_trial(space, study.ask()).model_dump() for _ in range(3)])
    assert drawn[0] == drawn[1]


def test_the_search_driver_imports_no_torch():
    code = ("import sys, search.run, search.searcher, search.tracking, search.results, search.export; "
            "from search.run import main; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_the_repo_space_validates_and_its_rungs_end_at_the_budget():
    from space.config import load_space

    space = load_space(REPO / "space.yaml")
    rungs = space.training.budget.steps()
    assert rungs[-1] == space.training.budget.max_steps and rungs == sorted(rungs)
    assert yaml.safe_load((REPO / "space.yaml").read_text())["search"]["pruner"] == "pareto"


def test_the_hypervolume_is_logged_after_every_completed_trial_and_never_falls():
    space = make_space({"search": {"concurrency": 6}, "training": {"learning_rate": {"low": 1e-3, "high": 1e-2}}})
    s, rec = searcher_for(space)  # a continuous learning rate: no two proposals are the same configuration
    ids = [tid for tid in (f"t{i}" for i in range(6)) if isinstance(s.suggest(tid), dict)]
    for i, tid in enumerate(ids):
        if i == 1:
            s.on_trial_complete(tid, error=True)
        else:
            finish(s, tid, 0.2 + 0.1 * i)
    steps = [step for step, _ in rec.volumes]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == s.completed == 6
    values = [v for _, v in rec.volumes]
    assert values == sorted(values) and values[-1] == s.hypervolume() > 0


def test_a_proposal_of_a_running_configuration_waits_for_it_and_reuses_its_result():
    space = make_space({"search": {"concurrency": 6}},
                       methods={"lora_in_proj": {"enabled": True, "rank": {"choices": [1]}}})
    s, rec = searcher_for(space)
    assert isinstance(s.suggest("t1"), dict)
    assert s.suggest("t2") is None  # the rest of the budget are twins of the running trial: nothing to train
    assert len(s.pending[s.live["t1"].key]) == 5
    finish(s, "t1", 0.6)
    assert [state for _, _, state, _ in rec.calls] == ["duplicate"] * 5
    assert s.suggest("t3") == Searcher.FINISHED


def test_twins_of_a_failed_trial_are_trained_after_it():
    space = make_space({"search": {"concurrency": 6, "num_trials": 2}},
                       methods={"lora_in_proj": {"enabled": True, "rank": {"choices": [1]}}})
    s, rec = searcher_for(space)
    assert isinstance(s.suggest("t1"), dict) and s.suggest("t2") is None
    s.on_trial_complete("t1", error=True)
    again = s.suggest("t3")
    assert isinstance(again, dict) and rec.calls == []
    finish(s, "t3", 0.5)
    assert states(s) == ["failed", "finished"]


def test_a_twin_of_a_pruned_trial_is_not_trained_again():
    space = make_space({"search": {"concurrency": 1, "num_trials": 3,
                                   "pruner": {"name": "pareto", "min_peers": 1, "min_better": 1}}},
                       methods={"lora_in_proj": {"enabled": True, "rank": {"choices": [1]}},
                                "a_log_delta": {"enabled": "search"}})
    s, rec = searcher_for(space)
    seen = {}
    for i in range(3):
        config = s.suggest(f"t{i}")
        if not isinstance(config, dict):
            break
        seen[f"t{i}"] = config
        if i == 0:
            finish(s, f"t{i}", 0.9)
        else:  # the other configuration: pruned at once by the better, no-larger first trial if it is larger
            pruned = s.rung(f"t{i}", {"step": 2, "val_accuracy": 0.1})
            s.on_trial_complete(f"t{i}", result={"step": 2, "val_accuracy": 0.1})
            assert pruned or s.state_of(f"t{i}") == "interrupted"
    notes = [note for *_, note in rec.calls]
    assert all("its result is reused" in n or "which was pruned at step 2" in n for n in notes)


def test_interrupt_marks_running_trials_interrupted_in_optuna():
    s, _ = searcher_for(make_space({"search": {"concurrency": 2}}))
    ids = [tid for tid in ("a", "b") if isinstance(s.suggest(tid), dict)]
    assert s.interrupt() == ids and not s.live
    assert set(states(s)) == {"interrupted"}
    assert all(t.state == TrialState.FAIL for t in s.phases[0].study.trials)


def test_a_proposal_that_cannot_be_built_fails_alone():
    class Broken(Sizes):
        def trainable(self, cfg):
            raise RuntimeError("the probe is gone")

    s = PeftSearcher(make_space(), optuna.storages.InMemoryStorage(), "s", Broken(), None, 100_000, Recorder(),
                     echo=lambda line: None)
    assert s.suggest("t1") == Searcher.FINISHED  # every proposal failed; the search ends instead of crashing
    study = s.phases[0].study
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 6
    assert "the probe is gone" in study.trials[0].user_attrs["mps_note"]


def test_the_search_is_complete_once_the_last_phase_is_spent_even_if_ray_stops_asking():
    space = make_space({"search": {"num_trials": 2, "concurrency": 2, "reevaluate": {"top": 1, "seeds": 1}},
                        "training": {"learning_rate": {"low": 1e-3, "high": 1e-2}}})
    s, _ = searcher_for(space)
    ids = [tid for tid in ("a", "b") if isinstance(s.suggest(tid), dict)]
    assert not s.exhausted()
    for tid in ids:
        finish(s, tid, 0.5)
    assert not s.exhausted()  # the re-evaluation is still to come
    again = s.suggest("r")
    assert isinstance(again, dict) and again["phase"] == "reevaluate" and not s.exhausted()
    finish(s, "r", 0.5)
    assert s.exhausted()  # Ray may stop at its sample count here, without asking again


def test_a_language_model_task_with_no_method_is_one_configuration_whatever_its_learning_rate():
    from search.searcher import config_key

    def cfg(task: dict, lr: float, methods: dict | None = None) -> TrialConfig:
        return TrialConfig.model_validate({"model": {}, "task": task, "methods": methods or {},
                                           "training": {"learning_rate": lr}})

    lm = {"name": "stdlib_docstrings"}
    assert config_key(cfg(lm, 1e-3)) == config_key(cfg(lm, 5e-3))  # nothing trains: the rate changes nothing
    assert config_key(cfg(lm, 1e-3, {"a_log_delta": {}})) != config_key(cfg(lm, 5e-3, {"a_log_delta": {}}))
    digits = {"name": "digits"}
    assert config_key(cfg(digits, 1e-3)) != config_key(cfg(digits, 5e-3))  # the head trains at that rate


def test_baselines_train_after_the_search_and_never_join_the_front_or_the_hypervolume():
    space = make_space({"search": {"num_trials": 3, "baselines": ["head", {"name": "full", "learning_rate": 1e-3}],
                                   "reevaluate": {"top": 1, "seeds": 1}}})
    s, _ = searcher_for(space)
    launched: list[dict] = []
    for i in range(20):
        config = s.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        if config is None:
            continue
        launched.append(config)
        cfg = TrialConfig.model_validate_json(config["trial"])
        finish(s, f"t{i}", 0.99 if cfg.baseline == "full" else 0.4 + 0.01 * i)
    phases = [c["phase"] for c in launched]
    assert phases == ["search"] * 3 + ["baseline"] * 2 + ["reevaluate"], phases
    baselines = [TrialConfig.model_validate_json(c["trial"]) for c in launched if c["phase"] == "baseline"]
    assert [b.baseline for b in baselines] == ["head", "full"] and not any(b.methods for b in baselines)
    assert baselines[1].training.learning_rate == 1e-3
    assert [c["number"] for c in launched[:3]] == [1, 2, 3]  # searched trials keep the first numbers
    # The full baseline's 0.99 would top the front: it is a reference, so neither the front, the hypervolume,
    # the best trial nor the re-evaluated configuration is it.
    assert all(r["cfg"].baseline is None for r in s._front())
    searched = [r for r in s.results if r["phase"] == "search"]
    assert s.hypervolume() == pytest.approx(search_hypervolume(searched, "val_accuracy", "trainable_params",
                                                                100_000))
    assert TrialConfig.model_validate_json(launched[-1]["trial"]).baseline is None


def test_a_baseline_takes_no_methods_and_its_learning_rate_defaults_to_the_middle_of_the_range():
    from space.config import baseline_trial

    space = make_space({"training": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
                        "search": {"baselines": ["full"]}})
    cfg = baseline_trial(space, space.search.baselines[0])
    assert cfg.baseline == "full" and cfg.methods == {} and cfg.training.learning_rate == pytest.approx(1e-3)
    assert cfg.summary() == "baseline: full fine-tuning"
    with pytest.raises(ValueError, match="a head baseline takes no methods, got a_log_delta"):
        TrialConfig.model_validate({"model": {}, "task": {"name": "digits"}, "baseline": "head",
                                    "methods": {"a_log_delta": {}}})
    with pytest.raises(ValueError, match="search.baselines.0.name"):
        SearchSpace.model_validate({"search": {"baselines": ["lora"]}})


def test_max_failures_stops_starting_trials_and_says_why():
    from search.searcher import ERROR_ATTR

    s, _ = searcher_for(make_space({"search": {"num_trials": 6, "max_failures": 1}}))
    lines: list[str] = []
    s.echo = lines.append
    for i in range(2):
        assert isinstance(s.suggest(f"t{i}"), dict)
        s.note_error(f"t{i}", f"FloatingPointError: loss is nan at step {i + 3}")  # Ray: scheduler, then searcher
        s.on_trial_complete(f"t{i}", error=True)
    assert s.suggest("t2") == Searcher.FINISHED and s.exhausted()
    assert s.stop_reason is not None and "search.max_failures 1: 2 trials failed" in s.stop_reason
    assert lines == [s.stop_reason]
    study = s.phases[0].study
    assert [t.user_attrs.get(ERROR_ATTR) for t in study.trials] == [
        "FloatingPointError: loss is nan at step 3", "FloatingPointError: loss is nan at step 4"]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_a_fraction_of_max_failures_counts_against_num_trials():
    s, _ = searcher_for(make_space({"search": {"num_trials": 8, "max_failures": 0.25}}))  # more than 2 fail
    for i in range(3):
        assert isinstance(s.suggest(f"t{i}"), dict)
        s.on_trial_complete(f"t{i}", error=True)
        if i < 2:
            assert s.stop_reason is None
    assert s.suggest("t3") == Searcher.FINISHED


def test_store_creation_is_tried_again_only_while_another_process_creates_the_same_thing():
    from search.tracking import settled

    calls = []

    def racing():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError('(psycopg2.errors.DuplicateTable) relation "alembic_version" already exists')
        return "store"

    assert settled(racing, wait=0.0) == "store" and len(calls) == 3

    def fails(exc):
        calls.append(1)
        raise exc

    calls.clear()
    with pytest.raises(ValueError, match="bad url"):
        settled(lambda: fails(ValueError("bad url")), wait=0.0)  # another error: raised at once
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(RuntimeError, match="already exists"):
        settled(lambda: fails(RuntimeError("already exists")), attempts=2, wait=0.0)
    assert len(calls) == 2
