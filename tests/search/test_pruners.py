from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
import pytest
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from search.pruners import (
    PRUNERS,
    RUNG_ATTR,
    SIZE_ATTR,
    HyperbandPruner,
    MedianPruner,
    ParetoPruner,
    PercentilePruner,
    SuccessiveHalvingPruner,
    make_pruner,
    record_rung,
    rung_values,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study() -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"])


def _add(
    study: optuna.Study, rungs: dict[int, float], size: int | None = None, state: TrialState = TrialState.COMPLETE
) -> FrozenTrial:
    """A finished trial (complete or pruned) with the given rung values and size."""
    attrs: dict[str, Any] = {RUNG_ATTR: {str(step): value for step, value in rungs.items()}}
    if size is not None:
        attrs[SIZE_ATTR] = size
    # The objectives are not what the pruners read; any finite pair makes a valid complete trial.
    values = [0.0, float(size or 0)] if state == TrialState.COMPLETE else None
    study.add_trial(optuna.trial.create_trial(state=state, values=values, user_attrs=attrs))
    return study.get_trials(deepcopy=False)[-1]


def _running(study: optuna.Study, rungs: dict[int, float], size: int | None = None) -> FrozenTrial:
    """A running trial whose rungs went through ``record_rung``, as the search records them."""
    trial = study.ask()
    if size is not None:
        trial.set_user_attr(SIZE_ATTR, size)
    for step, value in rungs.items():
        record_rung(study, trial._trial_id, step, value)
    return study._storage.get_trial(trial._trial_id)


def _placeholder(study: optuna.Study) -> None:
    """A trial without rung values: it only takes up a trial number."""
    _add(study, {})


# record_rung and rung_values


def test_record_rung_merges_steps_into_the_stored_attribute():
    study = _study()
    trial = study.ask()
    record_rung(study, trial._trial_id, 30, 0.41)
    record_rung(study, trial._trial_id, 60, 0.52)
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.user_attrs[RUNG_ATTR] == {"30": 0.41, "60": 0.52}
    assert rung_values(stored) == {30: 0.41, 60: 0.52}


def test_record_rung_replaces_a_step_recorded_again():
    study = _study()
    trial = study.ask()
    record_rung(study, trial._trial_id, 30, 0.41)
    record_rung(study, trial._trial_id, 30, 0.44)
    assert rung_values(study._storage.get_trial(trial._trial_id)) == {30: 0.44}


def test_rung_values_survive_a_restart_through_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "minimize"])
    trial = study.ask()
    record_rung(study, trial._trial_id, 30, 0.41)
    record_rung(study, trial._trial_id, 60, 0.52)
    reloaded = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url))
    assert rung_values(reloaded.trials[0]) == {30: 0.41, 60: 0.52}


def test_record_rung_rejects_a_negative_step():
    study = _study()
    trial = study.ask()
    with pytest.raises(ValueError, match="step=-30"):
        record_rung(study, trial._trial_id, -30, 0.4)


def test_rung_values_of_a_trial_without_rungs_are_empty():
    study = _study()
    assert rung_values(_running(study, {})) == {}


ALL_PRUNERS: list[Callable[[], BasePruner]] = [
    lambda: ParetoPruner("max", min_peers=1, min_better=1, margin=0.0),
    lambda: PercentilePruner("max", 25.0, min_peers=1),
    lambda: MedianPruner("max", min_peers=1),
    lambda: SuccessiveHalvingPruner("max", min_peers=1),
    lambda: HyperbandPruner("max", n_brackets=1, min_peers=1),
]


@pytest.mark.parametrize("make", ALL_PRUNERS, ids=["pareto", "percentile", "median", "sh", "hyperband"])
def test_a_trial_without_rung_values_is_never_pruned(make):
    study = _study()
    for value in (0.9, 0.8, 0.7):
        _add(study, {30: value}, size=1)
    trial = _running(study, {}, size=1)
    assert not make().prune(study, trial)
    # The same trial with a poor rung value is pruned by every pruner: the empty case above is what keeps it.
    record_rung(study, trial._trial_id, 30, 0.1)
    assert make().prune(study, study._storage.get_trial(trial._trial_id))


@pytest.mark.parametrize("make", ALL_PRUNERS, ids=["pareto", "percentile", "median", "sh", "hyperband"])
def test_a_diverged_trial_is_pruned(make):
    study = _study()
    trial = _running(study, {30: math.nan}, size=1)
    assert make().prune(study, trial)


# ParetoPruner


def test_pareto_prunes_when_min_better_no_larger_trials_are_clearly_better():
    study = _study()
    _add(study, {30: 0.60}, size=500)  # smaller, clearly better
    _add(study, {30: 0.58}, size=1000)  # same size, clearly better
    _add(study, {30: 0.40}, size=2000)
    trial = _running(study, {30: 0.50}, size=1000)
    assert ParetoPruner("max").prune(study, trial)


def test_pareto_keeps_a_trial_only_one_no_larger_trial_beats():
    study = _study()
    _add(study, {30: 0.60}, size=500)  # one lucky run
    _add(study, {30: 0.45}, size=1000)
    _add(study, {30: 0.40}, size=2000)
    trial = _running(study, {30: 0.50}, size=1000)
    assert not ParetoPruner("max", min_better=2).prune(study, trial)
    assert ParetoPruner("max", min_better=1).prune(study, trial)


def test_pareto_keeps_a_trial_beaten_only_by_larger_trials():
    study = _study()
    _add(study, {30: 0.70}, size=2000)
    _add(study, {30: 0.68}, size=1001)
    _add(study, {30: 0.40}, size=500)
    trial = _running(study, {30: 0.50}, size=1000)
    assert not ParetoPruner("max").prune(study, trial)


def test_pareto_keeps_a_trial_whose_gap_is_within_the_margin():
    study = _study()
    _add(study, {30: 0.515}, size=500)
    _add(study, {30: 0.51}, size=800)
    _add(study, {30: 0.40}, size=2000)
    trial = _running(study, {30: 0.50}, size=1000)
    assert not ParetoPruner("max", margin=0.02).prune(study, trial)
    assert ParetoPruner("max", margin=0.0).prune(study, trial)


def test_pareto_waits_until_min_peers_trials_reached_the_rung():
    study = _study()
    _add(study, {30: 0.60}, size=500)
    _add(study, {30: 0.58}, size=500)
    trial = _running(study, {30: 0.50}, size=1000)
    assert not ParetoPruner("max", min_peers=4).prune(study, trial)  # 3 trials at the rung
    _add(study, {30: 0.40}, size=2000)
    assert ParetoPruner("max", min_peers=4).prune(study, trial)


def test_pareto_does_not_prune_at_or_below_warmup_steps():
    study = _study()
    for value in (0.60, 0.58, 0.40):
        _add(study, {30: 0.5, 60: value}, size=500)
    trial = _running(study, {30: 0.5, 60: 0.50}, size=1000)
    assert not ParetoPruner("max", warmup_steps=60).prune(study, trial)
    assert ParetoPruner("max", warmup_steps=30).prune(study, trial)


def test_pareto_mirrors_for_a_loss_to_minimise():
    study = _study()
    _add(study, {30: 0.80}, size=500)
    _add(study, {30: 0.85}, size=1000)
    _add(study, {30: 1.50}, size=2000)
    trial = _running(study, {30: 1.00}, size=1000)
    assert ParetoPruner("min").prune(study, trial)
    assert not ParetoPruner("max").prune(study, trial)  # as accuracies, the two smaller values are worse


def test_pareto_without_size_attr_counts_every_peer_as_no_larger():
    study = _study()
    _add(study, {30: 0.70}, size=2000)
    _add(study, {30: 0.68}, size=3000)
    _add(study, {30: 0.40}, size=500)
    trial = _running(study, {30: 0.50}, size=1000)
    assert ParetoPruner("max", size_attr=None).prune(study, trial)


def test_pareto_counts_every_peer_as_no_larger_when_the_trial_has_no_size():
    study = _study()
    _add(study, {30: 0.70}, size=2000)
    _add(study, {30: 0.68}, size=3000)
    _add(study, {30: 0.40}, size=500)
    trial = _running(study, {30: 0.50}, size=None)
    assert ParetoPruner("max").prune(study, trial)


def test_pareto_does_not_count_a_peer_without_size_as_no_larger():
    study = _study()
    _add(study, {30: 0.70}, size=None)
    _add(study, {30: 0.68}, size=None)
    _add(study, {30: 0.40}, size=500)
    trial = _running(study, {30: 0.50}, size=1000)
    assert not ParetoPruner("max").prune(study, trial)


def test_pareto_compares_only_at_the_trials_latest_step():
    study = _study()
    _add(study, {30: 0.90}, size=500)  # far better at 30, never reached 60
    _add(study, {30: 0.90}, size=500)
    for _ in range(3):
        _add(study, {30: 0.20, 60: 0.40}, size=500)
    trial = _running(study, {30: 0.40, 60: 0.50}, size=1000)
    assert not ParetoPruner("max").prune(study, trial)


def test_pareto_counts_running_and_pruned_trials_that_reached_the_rung():
    study = _study()
    _running(study, {30: 0.60}, size=500)
    _add(study, {30: 0.58}, size=500, state=TrialState.PRUNED)
    _add(study, {30: 0.40}, size=2000)
    trial = _running(study, {30: 0.50}, size=1000)
    assert ParetoPruner("max").prune(study, trial)


def test_pareto_ignores_non_finite_peer_values():
    study = _study()
    _add(study, {30: math.inf}, size=500)
    _add(study, {30: math.nan}, size=500)
    _add(study, {30: 0.60}, size=500)
    _add(study, {30: 0.58}, size=500)
    trial = _running(study, {30: 0.50}, size=1000)
    assert not ParetoPruner("max", min_peers=4).prune(study, trial)  # only 3 trials with a finite value
    assert not ParetoPruner("max", min_peers=3, min_better=3).prune(study, trial)  # inf is not a better peer
    assert ParetoPruner("max", min_peers=3).prune(study, trial)


def test_pareto_decision_does_not_depend_on_trial_order():
    peers = [({30: 0.60}, 500), ({30: 0.58}, 1000), ({30: 0.40}, 2000)]
    decisions = set()
    for ordered in (peers, peers[::-1]):
        study = _study()
        trial = _running(study, {30: 0.50}, size=1000)
        for rungs, size in ordered:
            _add(study, rungs, size=size)
        decisions.add(ParetoPruner("max").prune(study, study._storage.get_trial(trial._trial_id)))
    assert decisions == {True}


# PercentilePruner and MedianPruner


@pytest.mark.parametrize(
    ("direction", "others", "own", "pruned"),
    [
        # max, keep the top 25 %: the threshold is the 75th percentile of the five values including the trial's.
        ("max", [0.1, 0.2, 0.4, 0.5], 0.30, True),  # [.1 .2 .3 .4 .5] -> 0.4; 0.30 < 0.4
        ("max", [0.1, 0.2, 0.4, 0.5], 0.45, False),  # [.1 .2 .4 .45 .5] -> 0.45; not below
        # min, keep the bottom 25 %: the threshold is the 25th percentile.
        ("min", [1.0, 2.0, 4.0, 5.0], 3.0, True),  # [1 2 3 4 5] -> 2; 3 > 2
        ("min", [1.0, 2.0, 4.0, 5.0], 1.5, False),  # [1 1.5 2 4 5] -> 1.5; not above
    ],
)
def test_percentile_keeps_only_the_best_percentile_at_the_rung(direction, others, own, pruned):
    study = _study()
    for value in others:
        _add(study, {30: value})
    trial = _running(study, {30: own})
    assert PercentilePruner(direction, 25.0).prune(study, trial) is pruned


@pytest.mark.parametrize(("own", "pruned"), [(0.3, True), (0.5, False)])
def test_median_prunes_a_trial_below_the_median_of_its_rung(own, pruned):
    study = _study()
    for value in (0.2, 0.4, 0.6, 0.8):
        _add(study, {30: value})
    trial = _running(study, {30: own})  # medians: [.2 .3 .4 .6 .8] -> 0.4, [.2 .4 .5 .6 .8] -> 0.5
    assert MedianPruner("max").prune(study, trial) is pruned


def test_percentile_waits_for_min_peers_and_warmup_steps():
    study = _study()
    for value in (0.2, 0.4, 0.6):
        _add(study, {30: 0.5, 60: value})
    trial = _running(study, {30: 0.5, 60: 0.1})
    assert not PercentilePruner("max", min_peers=5).prune(study, trial)
    assert not PercentilePruner("max", warmup_steps=60).prune(study, trial)
    assert PercentilePruner("max", min_peers=4, warmup_steps=30).prune(study, trial)


# SuccessiveHalvingPruner


@pytest.mark.parametrize(
    ("direction", "others", "own", "pruned"),
    [
        # n = 5, reduction_factor 2: keep the best ceil(5 / 2) = 3.
        ("max", [0.9, 0.8, 0.6, 0.5], 0.70, False),  # third best
        ("max", [0.9, 0.8, 0.6, 0.5], 0.55, True),  # fourth best; cut-off 0.6
        ("max", [0.9, 0.8, 0.6, 0.6], 0.60, False),  # ties the cut-off 0.6
        ("min", [0.1, 0.2, 0.4, 0.5], 0.30, False),
        ("min", [0.1, 0.2, 0.4, 0.5], 0.45, True),  # cut-off 0.4
    ],
)
def test_successive_halving_keeps_the_top_fraction_at_the_rung(direction, others, own, pruned):
    study = _study()
    for value in others:
        _add(study, {30: value})
    trial = _running(study, {30: own})
    assert SuccessiveHalvingPruner(direction, reduction_factor=2).prune(study, trial) is pruned


def test_successive_halving_reduction_factor_sets_the_kept_fraction():
    study = _study()
    for value in (0.9, 0.8, 0.6, 0.5, 0.4):
        _add(study, {30: value})
    trial = _running(study, {30: 0.7})  # third of six
    assert not SuccessiveHalvingPruner("max", reduction_factor=2).prune(study, trial)  # keeps 3
    assert SuccessiveHalvingPruner("max", reduction_factor=3).prune(study, trial)  # keeps 2


def test_successive_halving_waits_for_min_peers_and_warmup_steps():
    study = _study()
    for value in (0.9, 0.8, 0.7):
        _add(study, {30: 0.5, 60: value})
    trial = _running(study, {30: 0.5, 60: 0.1})
    assert not SuccessiveHalvingPruner("max", min_peers=5).prune(study, trial)
    assert not SuccessiveHalvingPruner("max", warmup_steps=60).prune(study, trial)
    assert SuccessiveHalvingPruner("max", min_peers=4, warmup_steps=30).prune(study, trial)


# HyperbandPruner (n_brackets 3: trial numbers 0, 3, 6, ... are bracket 0; 1, 4, 7, ... bracket 1; 2, 5, 8, ... 2)


def _bracketed(study: optuna.Study, n_brackets: int, bracket: int, rungs: dict[int, float]) -> FrozenTrial:
    """A finished trial in ``bracket``, after placeholders that advance the trial number to it."""
    while len(study.get_trials(deepcopy=False)) % n_brackets != bracket:
        _placeholder(study)
    return _add(study, rungs)


def _running_in_bracket(study: optuna.Study, n_brackets: int, bracket: int, rungs: dict[int, float]) -> FrozenTrial:
    while len(study.get_trials(deepcopy=False)) % n_brackets != bracket:
        _placeholder(study)
    return _running(study, rungs)


def test_hyperband_compares_a_trial_only_with_its_own_bracket():
    study = _study()
    for value in (0.3, 0.35, 0.4):
        _bracketed(study, 3, 1, {30: 0.5, 60: value})
    for _ in range(6):
        _bracketed(study, 3, 0, {30: 0.9, 60: 0.9})  # would prune it if brackets were pooled
    trial = _running_in_bracket(study, 3, 1, {30: 0.5, 60: 0.5})
    assert trial.number % 3 == 1
    assert not HyperbandPruner("max").prune(study, trial)


def test_hyperband_prunes_by_successive_halving_within_the_bracket():
    study = _study()
    for value in (0.9, 0.8, 0.7):
        _bracketed(study, 3, 1, {30: 0.5, 60: value})
    for _ in range(6):
        _bracketed(study, 3, 0, {30: 0.1, 60: 0.1})
    trial = _running_in_bracket(study, 3, 1, {30: 0.5, 60: 0.5})
    # n = 4 in bracket 1, reduction_factor 3: keep ceil(4 / 3) = 2, cut-off 0.8.
    assert HyperbandPruner("max", reduction_factor=3).prune(study, trial)


@pytest.mark.parametrize(("bracket", "n_rungs", "pruned"), [(0, 1, True), (2, 2, False), (2, 3, True)])
def test_hyperband_spares_a_trial_for_its_brackets_first_rungs(bracket, n_rungs, pruned):
    steps = [30, 60, 120][:n_rungs]
    study = _study()
    for _ in range(3):
        _bracketed(study, 3, bracket, {step: 0.9 for step in steps})
    trial = _running_in_bracket(study, 3, bracket, {step: 0.1 for step in steps})
    assert HyperbandPruner("max").prune(study, trial) is pruned


# make_pruner and argument checks


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("pareto", ParetoPruner),
        ("median", MedianPruner),
        ("percentile", PercentilePruner),
        ("successive_halving", SuccessiveHalvingPruner),
        ("hyperband", HyperbandPruner),
    ],
)
def test_make_pruner_builds_each_named_pruner(name, cls):
    assert type(make_pruner(name, "max")) is cls


def test_make_pruner_covers_every_name_in_pruners():
    for name in PRUNERS:
        make_pruner(name, "min")  # raises on a name it does not know


def test_make_pruner_returns_none_for_none():
    assert make_pruner("none", "max") is None


def test_make_pruner_passes_options_to_the_pruner():
    pruner = make_pruner("successive_halving", "max", reduction_factor=3, min_peers=1)
    study = _study()
    for value in (0.9, 0.8, 0.6, 0.5, 0.4):
        _add(study, {30: value})
    trial = _running(study, {30: 0.7})
    assert pruner is not None and pruner.prune(study, trial)  # reduction_factor 2 would keep it
    with pytest.raises(ValueError, match="percentile=150"):
        make_pruner("percentile", "max", percentile=150)


def test_make_pruner_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="'asha'.*pareto, median, percentile, successive_halving, hyperband, none"):
        make_pruner("asha", "max")


def test_make_pruner_rejects_an_option_the_pruner_does_not_take():
    with pytest.raises(ValueError, match="'median' has no option 'percentile'"):
        make_pruner("median", "max", percentile=10)
    with pytest.raises(ValueError, match="'none' takes no options"):
        make_pruner("none", "max", min_peers=2)


def test_make_pruner_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="direction='maximize'"):
        make_pruner("none", "maximize")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ParetoPruner("up"), "direction='up'"),
        (lambda: ParetoPruner("max", size_attr=""), "size_attr=''"),
        (lambda: ParetoPruner("max", min_better=0), "min_better=0"),
        (lambda: ParetoPruner("max", margin=-0.1), "margin=-0.1"),
        (lambda: ParetoPruner("max", margin=math.nan), "margin=nan"),
        (lambda: ParetoPruner("max", min_peers=0), "min_peers=0"),
        (lambda: ParetoPruner("max", warmup_steps=-1), "warmup_steps=-1"),
        (lambda: PercentilePruner("max", 101.0), "percentile=101.0"),
        (lambda: PercentilePruner("max", -1.0), "percentile=-1.0"),
        (lambda: MedianPruner("min", min_peers=0), "min_peers=0"),
        (lambda: SuccessiveHalvingPruner("max", reduction_factor=1), "reduction_factor=1"),
        (lambda: SuccessiveHalvingPruner("max", warmup_steps=-5), "warmup_steps=-5"),
        (lambda: HyperbandPruner("max", reduction_factor=1), "reduction_factor=1"),
        (lambda: HyperbandPruner("max", n_brackets=0), "n_brackets=0"),
        (lambda: HyperbandPruner("max", min_peers=0), "min_peers=0"),
    ],
)
def test_constructors_reject_bad_arguments_naming_them(build, message):
    with pytest.raises(ValueError, match=message):
        build()
