from __future__ import annotations

import math

import optuna
import pytest

from search.run import make_scheduler
from search.searcher import FinalResultOptunaSearch, make_searcher
from space.config import SearchSpace, load_space
from tests.conftest import REPO
from trials.run import FINISHED


def searcher_for(tmp_path) -> FinalResultOptunaSearch:
    space = load_space(REPO / "space.yaml")
    return make_searcher(space, "s", f"sqlite:///{tmp_path / 'optuna.db'}")


def state_of(searcher, trial_id: str):
    study = optuna.load_study(study_name="s", storage=searcher._storage)
    return {t.number: t.state for t in study.trials}[searcher._ot_trials[trial_id].number]


def test_trial_stopped_before_its_final_report_is_pruned_not_complete(tmp_path):
    s = searcher_for(tmp_path)
    s.suggest("t1")
    s.on_trial_complete("t1", result={"val_accuracy": 0.99, "trainable_params": 1, FINISHED: False})
    assert state_of(s, "t1") == optuna.trial.TrialState.PRUNED


def test_finished_trial_is_told_with_both_objectives(tmp_path):
    s = searcher_for(tmp_path)
    s.suggest("t1")
    s.on_trial_complete("t1", result={"val_accuracy": 0.5, "trainable_params": 123, FINISHED: True})
    study = optuna.load_study(study_name="s", storage=s._storage)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[0].values == [0.5, 123]
    assert study.best_trials[0].number == 0


def test_errored_trial_is_failed(tmp_path):
    s = searcher_for(tmp_path)
    s.suggest("t1")
    s.on_trial_complete("t1", result=None, error=True)
    assert state_of(s, "t1") == optuna.trial.TrialState.FAIL


def test_searcher_pickles_for_ray_checkpoints(tmp_path):
    s = searcher_for(tmp_path)
    s.suggest("t1")
    s.save(str(tmp_path / "searcher.pkl"))
    assert (tmp_path / "searcher.pkl").stat().st_size > 0


@pytest.mark.parametrize("steps, every, grace, expected", [(120, 30, 2, "AsyncHyperBandScheduler"),
                                                           (60, 30, 2, "FIFOScheduler")])
def test_early_stopping_uses_asha_only_when_there_are_rungs_past_the_grace_period(steps, every, grace, expected):
    space = SearchSpace.model_validate({"training": {"steps": steps, "eval_every": every},
                                        "search": {"early_stopping": {"grace_period": grace}}})
    sched = make_scheduler(space)
    assert type(sched).__name__ == expected
    if expected.startswith("Async"):
        assert sched._max_t == math.ceil(steps / every)
