"""The fidelity benchmark's ladder is the search's own, and its statistics read rankings correctly."""

from __future__ import annotations

import math

import pytest

from benchmarks.fidelity import ConfigRun, benchmark_space, geometric_rungs, rung_stats, stays_from


def run(i: int, accuracy: dict[int, float]) -> ConfigRun:
    return ConfigRun(index=i, summary="", params={}, trainable_params=1, seconds=0.0, accuracy=accuracy)


def test_the_ladder_is_the_budget_the_search_uses():
    assert geometric_rungs(15, 960) == [15, 30, 60, 120, 240, 480, 960]
    assert benchmark_space("digits", 960, 15, "mean").training.budget.steps() == geometric_rungs(15, 960)
    with pytest.raises(ValueError, match="--min-rung 2000"):
        geometric_rungs(2000, 960)


def test_a_rung_that_orders_configurations_as_the_end_does_has_spearman_one_and_a_reversed_one_minus_one():
    runs = [run(i, {10: 0.1 * i, 20: 1 - 0.1 * i, 40: 0.2 * i}) for i in range(5)]
    stats = {s.step: s for s in rung_stats(runs, [10, 20, 40], seed=0)}
    assert stats[10].spearman == pytest.approx(1.0) and stats[20].spearman == pytest.approx(-1.0)
    assert stats[40].mean == pytest.approx(0.4)
    assert stays_from(list(stats.values()), 0.9) == 40


def test_a_rung_where_every_configuration_is_equal_says_nothing():
    runs = [run(i, {10: 0.5, 20: 0.1 * i}) for i in range(4)]
    assert math.isnan(rung_stats(runs, [10, 20], seed=0)[0].spearman)
