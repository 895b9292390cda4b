from __future__ import annotations

import pandas as pd

from search.pareto import dominates, pareto_indices
from search.results import pareto


def test_dominance_needs_no_worse_everywhere_and_better_somewhere():
    assert dominates([1, 1], [0, 1])
    assert not dominates([1, 1], [1, 1])
    assert not dominates([2, 0], [1, 1])


def test_front_uses_each_metrics_direction():
    rows = [
        {"val_accuracy": 0.9, "trainable_params": 1000},  # best accuracy
        {"val_accuracy": 0.8, "trainable_params": 100},  # cheaper
        {"val_accuracy": 0.7, "trainable_params": 500},  # dominated by the row above
        {"val_accuracy": 0.6, "trainable_params": 10},  # cheapest
    ]
    assert pareto_indices(rows, ["val_accuracy", "trainable_params"]) == [0, 1, 3]


def test_rows_missing_an_objective_are_skipped():
    rows = [{"val_accuracy": 0.9}, {"val_accuracy": 0.5, "trainable_params": 10},
            {"val_accuracy": float("nan"), "trainable_params": 1}]
    assert pareto_indices(rows, ["val_accuracy", "trainable_params"]) == [1]


def test_pruned_and_failed_trials_never_reach_the_front():
    df = pd.DataFrame([
        {"trial": "a", "status": "finished", "val_accuracy": 0.6, "trainable_params": 100},
        {"trial": "b", "status": "pruned", "val_accuracy": 0.9, "trainable_params": 10},
        {"trial": "c", "status": "failed", "val_accuracy": 0.95, "trainable_params": 5},
        {"trial": "d", "status": "finished", "val_accuracy": 0.7, "trainable_params": 1000},
    ])
    front = pareto(df, ["val_accuracy", "trainable_params"])
    assert front.trial.tolist() == ["d", "a"]  # most accurate first
