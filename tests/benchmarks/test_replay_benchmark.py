"""The pruning replay walks recorded trials in order, prunes with the project's pruners, and counts what it saved."""

from __future__ import annotations

import json

import pytest

from benchmarks.replay import evaluate, main, replay
from benchmarks.search import run_search
from search.pruners import ParetoPruner


def _curve(number: int, size: int, rungs: dict[int, float], final: float) -> dict:
    return {"phase": "search", "number": number, "state": "finished", "trainable_params": size,
            "rungs": {str(s): v for s, v in rungs.items()}, "values": [final, float(size)], "params": {}}


def _row(curves: list[dict]) -> dict:
    return {"task": "digits", "seed": 0, "base_params": 100_000, "max_steps": 240, "curves": curves}


def test_without_a_pruner_every_trial_trains_to_the_full_budget():
    row = _row([_curve(i, 1000 * (i + 1), {30: 0.2, 60: 0.3}, 0.5) for i in range(4)])
    got = replay(row, None)
    assert got["steps"] == 4 * 240 and got["pruned"] == 0 and got["hypervolume"] > 0


def test_a_trial_dominated_at_a_rung_stops_there_and_leaves_the_front():
    curves = [_curve(0, 500, {30: 0.60, 60: 0.70}, 0.80),
              _curve(1, 800, {30: 0.65, 60: 0.72}, 0.70),
              # dominated at 30 by both smaller trials: stops at 30, so its final 0.95 never counts
              _curve(2, 1000, {30: 0.40, 60: 0.80}, 0.95),
              _curve(3, 2000, {30: 0.70, 60: 0.75}, 0.85)]
    row = _row(curves)
    got = replay(row, ParetoPruner("max", min_peers=2, margin=0.0))
    assert got["pruned"] == 1 and got["steps"] == 3 * 240 + 30
    assert got["hypervolume"] < replay(row, None)["hypervolume"]  # the pruned trial was on the unpruned front


def test_order_matters_a_trial_is_judged_only_against_earlier_ones():
    # The same poor trial first: with no peers yet it is never judged, so it trains to the end.
    curves = [_curve(0, 1000, {30: 0.40}, 0.95), _curve(1, 500, {30: 0.60}, 0.80)]
    got = replay(_row(curves), ParetoPruner("max", min_peers=2, margin=0.0))
    assert got["pruned"] == 0 and got["steps"] == 2 * 240


def test_evaluate_reports_ratios_against_the_same_trials_unpruned():
    curves = [_curve(0, 500, {30: 0.60}, 0.80), _curve(1, 1000, {30: 0.40}, 0.50), _curve(2, 900, {30: 0.3}, 0.4)]
    result = evaluate([_row(curves)], "pareto", {"min_better": 1, "min_peers": 2, "margin": 0.0})
    assert result["steps"] == pytest.approx((240 + 30 + 30) / (3 * 240))
    assert result["hypervolume"] == pytest.approx(1.0)  # the two pruned trials were dominated at the end too


def test_main_refuses_files_without_unpruned_curves(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": [{"task": "digits", "seed": 0, "arm": "tpe+pareto"}]}))
    with pytest.raises(SystemExit):
        main([str(path)])
    assert "no unpruned search" in capsys.readouterr().err


def test_main_asks_for_max_steps_when_the_file_lacks_it(tmp_path, capsys):
    row = _row([_curve(0, 500, {30: 0.6}, 0.8)])
    del row["max_steps"]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": [row]}))
    with pytest.raises(SystemExit):
        main([str(path)])
    assert "give --max-steps" in capsys.readouterr().err


@pytest.mark.slow
def test_a_recorded_unpruned_search_replays_to_its_own_figures():
    row = run_search("digits", "tpe", 0, 3, 2, 4)
    assert len(row["curves"]) == 3 and all(c["rungs"] and c["trainable_params"] for c in row["curves"])
    got = replay(json.loads(json.dumps(row)), None)  # through JSON, as the file stores it
    assert got["steps"] == row["steps"] and got["hypervolume"] == pytest.approx(row["hypervolume"], rel=1e-12)
