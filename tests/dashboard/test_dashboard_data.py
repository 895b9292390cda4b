"""dashboard.data as plain functions: the running/stale rule, method families, and the config diff."""

from __future__ import annotations

import pandas as pd

from dashboard import data
from search import results

NOW = pd.Timestamp("2026-11-29 12:00")


def test_a_running_search_with_a_recent_event_is_live() -> None:
    state = data.search_state("running", "RUNNING", NOW - pd.Timedelta(minutes=59), NOW)
    assert (state.state, state.live) == ("running", True)


def test_a_running_search_silent_for_longer_than_the_limit_is_stale() -> None:
    state = data.search_state("running", "RUNNING", NOW - data.STALE_AFTER - pd.Timedelta(minutes=1), NOW)
    assert (state.state, state.live) == (data.STATE_STALE, False)
    assert "never resumed" in state.note


def test_a_search_whose_mlflow_run_ended_without_a_state_is_killed() -> None:
    state = data.search_state("running", "KILLED", NOW, NOW)
    assert (state.state, state.live) == (data.STATE_KILLED, False)


def test_a_search_that_recorded_how_it_ended_keeps_that_state() -> None:
    assert data.search_state("finished", "FINISHED", NOW - pd.Timedelta(days=3), NOW).state == "finished"


def test_the_last_event_is_the_latest_start_end_or_report() -> None:
    df = pd.DataFrame({"start_time": [NOW - pd.Timedelta(hours=3)], "end_time": [pd.NaT]})
    report = NOW - pd.Timedelta(minutes=5)
    assert data.last_event(NOW - pd.Timedelta(hours=4), df, [report]) == report


def test_a_trials_families_come_from_its_summary() -> None:
    assert data.trial_family("lora_in_proj(r=2) + a_log_delta + prompt_tuning") == "LoRA + parameter deltas + prompts"
    assert data.trial_family("head only") == data.NO_METHOD
    assert data.trial_family("baseline: full fine-tuning") == data.BASELINE_FAMILY


def test_config_diff_keeps_only_the_keys_that_differ() -> None:
    diff = data.config_diff({"a": "seed: 1\nmethods: {lora: {rank: 2}}\ntask: x\n", "b": "seed: 2\ntask: x\n"})
    assert diff.set_index("key").to_dict("index") == {"seed": {"a": "1", "b": "2"},
                                                      "methods.lora.rank": {"a": "2", "b": ""}}


def test_best_so_far_counts_every_completed_trial_but_only_finished_values() -> None:
    df = pd.DataFrame({"trial": ["t1", "t2", "t3", "t4"], "status": ["finished", "pruned", "finished", "finished"],
                       "phase": "search", "val_accuracy": [0.5, 0.9, 0.7, 0.6],
                       "end_time": pd.to_datetime([1, 2, 3, 4], unit="s")})
    assert data.best_so_far(df, "val_accuracy").best.tolist() == [0.5, 0.5, 0.7, 0.7]


def test_reevaluation_seeds_and_baselines_are_not_searched_trials() -> None:
    df = pd.DataFrame({"phase": ["search", results.REEVALUATE, results.BASELINE, "stage2"]})
    assert data.searched(df).phase.tolist() == ["search", "stage2"]
