"""The search benchmark's arms are valid spaces and its ratios are computed per task and seed."""

from __future__ import annotations

import pytest

from benchmarks.search import ARMS, bench_space, ratios, run_search


@pytest.mark.parametrize("arm", list(ARMS))
def test_every_arm_is_a_valid_space_of_the_same_dimensions(arm):
    space = bench_space("digits", arm, 1, 24, 30, 240)
    assert space.search.num_trials == 24 and space.search.seed == 1
    assert space.training.budget.steps() == [30, 60, 120, 240]
    assert space.search.sampler == ARMS[arm]["sampler"] and space.search.pruner.name == ARMS[arm]["pruner"]


def test_pruner_options_reach_the_pruned_arms_only():
    pruned = bench_space("digits", "tpe+pareto", 0, 24, 30, 240, {"min_better": 1, "margin": 0.0})
    assert pruned.search.pruner.min_better == 1 and pruned.search.pruner.margin == 0.0
    assert bench_space("digits", "tpe", 0, 24, 30, 240, {"min_better": 1}).search.pruner.name == "none"


def test_ratios_pair_the_arms_per_task_and_seed():
    rows = [{"task": "digits", "seed": s, "arm": arm, "steps": steps, "hypervolume": hv, "best": 0.5}
            for s in (0, 1)
            for arm, steps, hv in (("tpe+pareto", 400, 1.0), ("tpe", 1000, 1.01), ("random+pareto", 500, 0.9),
                                   ("two_stage+pareto", 450, 1.1))]
    r = ratios(rows)
    assert r["pruning_steps_ratio (tpe+pareto / tpe)"] == pytest.approx(0.4)
    assert r["pruning_hypervolume_ratio (tpe+pareto / tpe)"] == pytest.approx(1 / 1.01)
    assert r["sampler_hypervolume_ratio (tpe+pareto / random+pareto)"] == pytest.approx(1 / 0.9)
    assert r["strategy_hypervolume_ratio (two_stage / tpe+pareto)"] == pytest.approx(1.1)


@pytest.mark.slow
def test_one_search_runs_in_process_and_counts_its_steps():
    row = run_search("digits", "tpe+pareto", 0, 3, 2, 4)
    assert row["trials"] == 3 and sum(row["states"].values()) == 3
    assert 3 * 2 <= row["steps"] <= 3 * 4 and row["hypervolume"] > 0
