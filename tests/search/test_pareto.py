from __future__ import annotations

import pandas as pd
import pytest

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


def _front_with_seeds():
    import pandas as pd

    from search import results

    df = pd.DataFrame([
        {"trial": "trial-001", "status": "finished", "phase": "search", "reevaluates": "", "val_accuracy": 0.60,
         "trainable_params": 1_000, "test_accuracy": 0.58},
        {"trial": "trial-002", "status": "finished", "phase": "search", "reevaluates": "", "val_accuracy": 0.63,
         "trainable_params": 5_000, "test_accuracy": 0.61},
        {"trial": "trial-003", "status": "finished", "phase": "search", "reevaluates": "", "val_accuracy": 0.80,
         "trainable_params": 9_000, "test_accuracy": 0.79},
        # seeds of the re-evaluation
        *({"trial": f"trial-1{i}", "status": "finished", "phase": "reevaluate", "reevaluates": of,
           "val_accuracy": v, "trainable_params": n, "test_accuracy": v}
          for i, (of, v, n) in enumerate([("trial-001", 0.62, 1_000), ("trial-001", 0.58, 1_000),
                                          ("trial-002", 0.57, 5_000), ("trial-002", 0.66, 5_000),
                                          ("trial-003", 0.79, 9_000), ("trial-003", 0.81, 9_000)])),
    ])
    objectives = ["val_accuracy", "trainable_params"]
    return results, df, objectives, results.reevaluated(df, results.pareto(df, objectives), objectives)


def test_reevaluated_front_reports_mean_and_spread_and_marks_an_advantage_within_the_noise():
    _, _, _, front = _front_with_seeds()
    rows = front.set_index("trial")
    assert list(rows.seeds) == [3, 3, 3]
    assert rows.loc["trial-001", "val_accuracy_mean"] == pytest.approx(0.60)
    assert rows.loc["trial-002", "val_accuracy_mean"] == pytest.approx(0.62)
    # trial-002 beats the smaller trial-001 by 0.02 with seeds spread by ~0.045: within the noise.
    assert rows.loc["trial-002", "noise"] == "within noise of trial-001"
    assert rows.loc["trial-003", "noise"] == "" and rows.loc["trial-001", "noise"] == ""
    assert set(front.phase) == {"search"}  # re-evaluation runs are seeds, never front points


def test_best_trial_is_chosen_by_the_mean_over_seeds():
    results, _, objectives, front = _front_with_seeds()
    assert results.best_trial(front, objectives)["trial"] == "trial-003"
    means = front.assign(val_accuracy_mean=[0.5, 0.9, 0.6][: len(front)])
    assert results.best_trial(means, objectives)["trial"] == means.sort_values("val_accuracy_mean").iloc[-1].trial


def test_baselines_are_listed_apart_and_never_reach_the_front():
    from search.results import baselines

    df = pd.DataFrame({"trial": ["trial-001", "trial-002", "trial-003", "trial-004"],
                       "status": ["finished", "finished", "finished", "failed"],
                       "phase": ["search", "baseline", "baseline", "baseline"],
                       "val_accuracy": [0.5, 0.9, 0.4, 0.95], "trainable_params": [1000, 150_000, 650, 650]})
    front = pareto(df, ["val_accuracy", "trainable_params"])
    assert list(front.trial) == ["trial-001"]  # the full baseline's 0.9 and the head's 650 would both be on it
    assert list(baselines(df).trial) == ["trial-002", "trial-003"]  # finished ones only


def _front_for_picks() -> pd.DataFrame:
    # A front that climbs fast, then flattens: the knee is where it flattens (trial c).
    return pd.DataFrame({"trial": ["a", "b", "c", "d", "e"], "run_id": ["ra", "rb", "rc", "rd", "re"],
                         "val_accuracy": [0.30, 0.55, 0.70, 0.72, 0.73],
                         "trainable_params": [100, 1_000, 10_000, 100_000, 1_000_000],
                         "trainable_pct": [0.01, 0.1, 1.0, 10.0, 100.0]})


@pytest.mark.parametrize("pick, trial", [
    ("best", "e"), ("knee", "c"), ("budget=20000", "c"), ("budget=20,000", "c"), ("budget=0.5%", "b"),
    ("budget=100", "a"),
])
def test_export_picks_the_best_the_knee_or_the_best_within_a_budget(pick, trial):
    from search.results import pick_trial

    got = pick_trial(_front_for_picks(), ["val_accuracy", "trainable_params"], pick)
    assert got is not None and got["trial"] == trial


def test_a_budget_no_front_trial_fits_and_a_malformed_pick_are_told_apart():
    from search.results import pick_trial

    assert pick_trial(_front_for_picks(), ["val_accuracy", "trainable_params"], "budget=50") is None
    for bad in ("median", "budget=lots", "budget=%"):
        with pytest.raises(ValueError, match=f"--pick '{bad}'"):
            pick_trial(_front_for_picks(), ["val_accuracy", "trainable_params"], bad)


def test_the_knee_of_a_minimised_quality_and_of_a_short_front():
    from search.results import pick_trial

    front = _front_for_picks().rename(columns={"val_accuracy": "val_loss"})
    front["val_loss"] = 1.0 - front["val_loss"]  # the same shape, as a loss
    assert pick_trial(front, ["val_loss", "trainable_params"], "knee")["trial"] == "c"
    assert pick_trial(_front_for_picks().iloc[:2], ["val_accuracy", "trainable_params"], "knee")["trial"] == "b"
