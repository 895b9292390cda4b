"""Hypervolume of a front against hand-computed areas, in quality x log10(size)."""

from __future__ import annotations

import math

import pytest

from search.hypervolume import hypervolume_2d, search_hypervolume


def test_two_dimensional_hypervolume_equals_the_hand_computed_staircase():
    # Minimised (x, y), reference (4, 4). Points (1, 3), (2, 2), (3, 1) and a dominated (3, 3):
    # strips x in [1, 2): height 1; [2, 3): height 2; [3, 4): height 3 -> 1 + 2 + 3 = 6.
    assert hypervolume_2d([(1, 3), (2, 2), (3, 1), (3, 3)], (4, 4)) == pytest.approx(6.0)


def test_points_outside_the_reference_add_nothing():
    assert hypervolume_2d([(5, 1), (1, 5), (4, 0)], (4, 4)) == 0.0
    assert hypervolume_2d([], (4, 4)) == 0.0


def test_search_hypervolume_uses_accuracy_zero_and_full_fine_tuning_as_reference():
    # Base model 100,000 parameters: reference (accuracy 0, log10 1e5 = 5).
    rows = [{"val_accuracy": 0.5, "trainable_params": 1_000},  # log10 3: width 0.5 between acc 0 and 0.5
            {"val_accuracy": 0.8, "trainable_params": 10_000},  # log10 4
            {"val_accuracy": 0.4, "trainable_params": 10_000}]  # dominated
    # In minimised coordinates (-acc, log10 size): points (-0.8, 4), (-0.5, 3); reference (0, 5).
    # Strip [-0.8, -0.5): height 5 - 4 = 1 -> 0.3; strip [-0.5, 0): height 5 - 3 = 2 -> 1.0. Total 1.3.
    hv = search_hypervolume(rows, "val_accuracy", "trainable_params", 100_000)
    assert hv == pytest.approx(1.3)


def test_adding_a_dominated_trial_never_changes_the_hypervolume_and_a_better_one_raises_it():
    rows = [{"val_accuracy": 0.6, "trainable_params": 2_000}]
    base = search_hypervolume(rows, "val_accuracy", "trainable_params", 150_000)
    worse = search_hypervolume([*rows, {"val_accuracy": 0.5, "trainable_params": 3_000}], "val_accuracy",
                               "trainable_params", 150_000)
    better = search_hypervolume([*rows, {"val_accuracy": 0.7, "trainable_params": 1_000}], "val_accuracy",
                                "trainable_params", 150_000)
    assert worse == pytest.approx(base) and better > base
    assert base == pytest.approx(0.6 * (math.log10(150_000) - math.log10(2_000)))


def test_percentage_size_uses_one_hundred_percent_as_reference():
    hv = search_hypervolume([{"val_accuracy": 0.5, "trainable_pct": 1.0}], "val_accuracy", "trainable_pct",
                             10_000)
    assert hv == pytest.approx(0.5 * (2 - 0))


def test_without_a_size_objective_it_is_the_best_quality_above_its_reference():
    assert search_hypervolume([{"val_accuracy": 0.3}, {"val_accuracy": 0.6}], "val_accuracy", None, 10) == 0.6


def test_a_trial_with_nothing_trainable_counts_as_one_parameter():
    rows = [{"val_loss": 2.0, "trainable_params": 0}, {"val_loss": 1.0, "trainable_params": 100},
            {"val_loss": 3.0, "trainable_params": 1000}]
    # loss reference: the worst finished value, 3.0; sizes 0 -> log10(1) = 0, 100 -> 2, reference log10(1e4) = 4
    assert search_hypervolume(rows, "val_loss", "trainable_params", 10_000) == pytest.approx(1.0 * 2 + 2.0 * 2)
    pct = [{"val_loss": 2.0, "trainable_pct": 0.0}, {"val_loss": 3.0, "trainable_pct": 50.0}]
    # one parameter of 10,000 is 0.01 %: log10(0.01) = -2, reference log10(100) = 2
    assert search_hypervolume(pct, "val_loss", "trainable_pct", 10_000) == pytest.approx(1.0 * 4)
