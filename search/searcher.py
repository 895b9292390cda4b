"""Optuna inside Ray Tune: the define-by-run space and a searcher that keeps stopped trials off the front."""

from __future__ import annotations

import warnings
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from space.config import SearchSpace, sample_trial
from trials.run import FINISHED


class DefineByRun:
    """Suggests every searched dimension of a space on an Optuna trial (picklable for searcher checkpoints)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        sample_trial(self.space, trial)


class FinalResultOptunaSearch(OptunaSearch):
    """Tells Optuna PRUNED for a trial stopped before its final report.

    Ray completes a scheduler-stopped trial with its last, partial result, which plain OptunaSearch records as
    COMPLETE: a cheap configuration stopped early would then sit on the study's Pareto front and steer the
    sampler with low-fidelity values.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not result.get(FINISHED):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


def make_sampler(space: SearchSpace):
    import optuna

    seed = space.search.seed
    if space.search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if space.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Multivariate TPE with the constant liar: suited to conditional spaces and parallel suggestions.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is experimental
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, space.search.num_trials // 3)))


def make_searcher(space: SearchSpace, study_name: str, storage_url: str) -> FinalResultOptunaSearch:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    return FinalResultOptunaSearch(
        space=DefineByRun(space), metric=[o.metric for o in space.objectives],
        mode=[o.mode for o in space.objectives], sampler=make_sampler(space), seed=space.search.seed,
        study_name=study_name, storage=optuna.storages.RDBStorage(storage_url))
