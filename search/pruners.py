"""Optuna pruners for a multi-objective study, judged on rung values stored as trial user attributes.

Optuna's ``Trial.report`` raises ``NotImplementedError`` in a multi-objective study, so its own pruners never see
an intermediate value here. Instead the search records each trial's rung metric with :func:`record_rung` under the
user attribute ``RUNG_ATTR`` (``{"30": 0.41, "60": 0.52}``: keys are ``str(step)`` because user attributes are
JSON), and every pruner below reads it back with :func:`rung_values`. The pruners are plain
``optuna.pruners.BasePruner`` subclasses: they work in any Optuna study, with or without Ray.

Shared rules, for every pruner:

- a trial is judged at its latest rung ``s`` (its largest recorded step), against the other trials' values at that
  same ``s`` only. Rungs are the same budgets for every trial of a study, so values at one step are comparable and
  values at different steps are not;
- peers are all other trials with a finite value at ``s``, whatever their state (complete, pruned, running, failed):
  a trial that was pruned later, or is still running, was measured at ``s`` all the same;
- a trial with no rung values is never pruned;
- fewer than ``min_peers`` trials with a value at ``s`` (the trial itself included) means not enough evidence at
  this rung yet, and the trial is kept;
- a trial whose own latest value is not finite (NaN or infinite: training diverged) is pruned once it is past its
  warm-up, without needing peers, as Optuna's own pruners prune a NaN intermediate value;
- decisions depend only on the recorded values and sizes, never on the order trials arrived in or their numbers
  (except :class:`HyperbandPruner`, whose bracket is ``trial.number % n_brackets``).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

from space.metrics import Direction

__all__ = [
    "PRUNERS",
    "RUNG_ATTR",
    "SIZE_ATTR",
    "HyperbandPruner",
    "MedianPruner",
    "ParetoPruner",
    "PercentilePruner",
    "SuccessiveHalvingPruner",
    "make_pruner",
    "record_rung",
    "rung_values",
]

RUNG_ATTR = "rung_values"
SIZE_ATTR = "trainable_params"

PRUNERS = ("pareto", "median", "percentile", "successive_halving", "hyperband", "none")


def record_rung(study: optuna.Study, trial_id: int, step: int, value: float) -> None:
    """Merge ``value`` at ``step`` into the trial's ``RUNG_ATTR``; recording a step again replaces its value (a
    trial restored from a checkpoint reports its rung again).

    ``trial_id`` is the storage id (``trial._trial_id``), not the trial number. The read-merge-write is not atomic:
    one trial's rungs must be recorded by one writer at a time, which holds because a trial reports its own rungs in
    order.
    """
    step = operator.index(step)  # accepts numpy integers, refuses floats such as 30.0
    if step < 0:
        raise ValueError(f"step cannot be negative, but got {step=}.")
    current = study._storage.get_trial(trial_id).user_attrs.get(RUNG_ATTR) or {}
    study._storage.set_trial_user_attr(trial_id, RUNG_ATTR, {**current, str(step): float(value)})


def rung_values(trial: FrozenTrial) -> dict[int, float]:
    """The trial's recorded rung values as ``{step: value}``, in increasing step order; empty when there are none."""
    raw = trial.user_attrs.get(RUNG_ATTR)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"trial {trial.number}: user attribute {RUNG_ATTR!r} must map str(step) to a value, but got {raw!r}."
        )
    return dict(sorted((int(step), float(value)) for step, value in raw.items()))


def _check_direction(direction: str) -> Direction:
    if direction == "max":
        return "max"
    if direction == "min":
        return "min"
    raise ValueError(f"direction must be 'max' or 'min', but got {direction=}.")


def _check_min_peers(min_peers: int) -> int:
    if min_peers < 1:
        raise ValueError(f"min_peers must be at least 1, but got {min_peers=}.")
    return min_peers


def _check_warmup_steps(warmup_steps: int) -> int:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps cannot be negative, but got {warmup_steps=}.")
    return warmup_steps


def _check_reduction_factor(reduction_factor: int) -> int:
    if reduction_factor < 2:
        raise ValueError(f"reduction_factor must be at least 2, but got {reduction_factor=}.")
    return reduction_factor


def _latest(trial: FrozenTrial) -> tuple[int, int, float] | None:
    """``(index, step, value)`` of the trial's latest rung, ``index`` counting its own recorded rungs from 0."""
    values = rung_values(trial)
    if not values:
        return None
    step = max(values)
    return len(values) - 1, step, values[step]


def _peers_at(study: optuna.Study, trial: FrozenTrial, step: int) -> list[tuple[FrozenTrial, float]]:
    """Other trials with a finite value at ``step``, any state, with that value."""
    key = str(step)
    peers = []
    for other in study.get_trials(deepcopy=False):
        raw = other.user_attrs.get(RUNG_ATTR)
        if other.number == trial.number or not isinstance(raw, dict) or key not in raw:
            continue
        value = float(raw[key])
        if math.isfinite(value):
            peers.append((other, value))
    return peers


def _sign(direction: Direction) -> float:
    """Multiplier that turns a value into a score where higher is better."""
    return 1.0 if direction == "max" else -1.0


def _in_top_fraction(value: float, others: list[float], reduction_factor: int, sign: float) -> bool:
    """Successive halving's rule: whether ``value`` is among the best ``ceil(n / reduction_factor)`` of the ``n``
    values (``others`` plus itself); a value tying the cut-off is kept, so ties never split arbitrarily."""
    scores = sorted((sign * v for v in [*others, value]), reverse=True)
    cutoff = scores[math.ceil(len(scores) / reduction_factor) - 1]
    return sign * value >= cutoff


class _RungPruner(BasePruner):
    """The rules every rung pruner but Hyperband shares (module docstring); subclasses judge the trial's latest
    finite value against its peers at that rung in ``_judge``."""

    _min_peers: int
    _warmup_steps: int

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        latest = _latest(trial)
        if latest is None:
            return False
        _, step, value = latest
        if step <= self._warmup_steps:
            return False
        if not math.isfinite(value):
            return True
        peers = _peers_at(study, trial, step)
        if len(peers) + 1 < self._min_peers:
            return False
        return self._judge(trial, value, peers)

    def _judge(self, trial: FrozenTrial, value: float, peers: list[tuple[FrozenTrial, float]]) -> bool:
        raise NotImplementedError


class ParetoPruner(_RungPruner):
    """Prune a trial that a trial no larger than it already clearly beat at the same rung.

    The search is for the front of rung metric vs trainable parameters, and a trial can only reach that front by
    beating the metric of every trial no larger than itself: a larger trial that beats it cannot keep it off the
    front (it is costlier), only a no-larger one can dominate it. So at its latest rung ``s > warmup_steps``, with
    at least ``min_peers`` trials (itself included) measured at ``s``, count the peers whose size is ``<=`` its own
    and whose value is better by at least ``margin`` (``peer >= value + margin`` for ``max``, ``peer <= value -
    margin`` for ``min``); prune when that count reaches ``min_better``. With ``min_better=1`` this is pruning
    what is margin-dominated at the rung.

    ``margin=0.02``: rung values are noisy (validation accuracy on a few hundred examples moves by about 0.02
    between seeds), so a smaller gap is not evidence that the peer is better. ``min_better=2``: one lucky run must
    not prune a trial on its own, and the bolder ``min_better=1``, although it keeps the front of a fixed sequence
    of trials almost intact (``python -m benchmarks.replay``), cost real TPE searches 8 to 19 % of their
    hypervolume: TPE ranks pruned trials worst, so with more of them it turns away from configurations that start
    slowly and finish well (the README's "How the search works" has both measurements). A rule that also compared
    a trial's optimistic projection (its rung value plus the largest gain any finished trial made from that rung)
    with the finished front was tried and dropped: it prunes nothing that ``min_better=1`` keeps, since a finished
    peer that dominates the projection was already better at the rung.

    Sizes come from the user attribute ``size_attr`` (closed-form, known before training). When ``size_attr`` is
    None or the trial has no size, every peer counts as no larger, and the rule becomes "``min_better`` trials are
    clearly better at this rung". When the trial has a size, a peer without one is not counted as no larger: the
    pruner cannot show that it dominates.
    """

    def __init__(
        self,
        direction: Direction,
        *,
        size_attr: str | None = SIZE_ATTR,
        min_better: int = 2,
        margin: float = 0.02,
        min_peers: int = 4,
        warmup_steps: int = 0,
    ) -> None:
        self._direction = _check_direction(direction)
        if size_attr is not None and not size_attr:
            raise ValueError(f"size_attr must be a user attribute name or None, but got {size_attr=}.")
        if min_better < 1:
            raise ValueError(f"min_better must be at least 1, but got {min_better=}.")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, but got {margin=}.")
        self._size_attr = size_attr
        self._min_better = min_better
        self._margin = margin
        self._min_peers = _check_min_peers(min_peers)
        self._warmup_steps = _check_warmup_steps(warmup_steps)

    def _size(self, trial: FrozenTrial) -> float | None:
        if self._size_attr is None or self._size_attr not in trial.user_attrs:
            return None
        size = trial.user_attrs[self._size_attr]
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ValueError(
                f"trial {trial.number}: user attribute {self._size_attr!r} must be a number, but got {size!r}."
            )
        return float(size)

    def _judge(self, trial: FrozenTrial, value: float, peers: list[tuple[FrozenTrial, float]]) -> bool:
        sign = _sign(self._direction)
        size = self._size(trial)
        better = 0
        for peer, peer_value in peers:
            if size is not None:
                peer_size = self._size(peer)
                if peer_size is None or peer_size > size:
                    continue
            if sign * peer_value >= sign * value + self._margin:
                better += 1
        return better >= self._min_better


class PercentilePruner(_RungPruner):
    """Keep a trial only if its value at its latest rung is in the best ``percentile`` % of the values there.

    Same semantics as ``optuna.pruners.PercentilePruner`` (``percentile=25`` keeps the top quarter): over the values
    of all trials measured at the step, the trial's own included, prune when ``value < nanpercentile(values, 100 -
    percentile)`` for ``max`` or ``value > nanpercentile(values, percentile)`` for ``min``. Including the trial
    itself can only move the threshold towards it, so it errs on the side of keeping. Judged only at steps
    ``> warmup_steps`` and with at least ``min_peers`` values at the step.
    """

    def __init__(
        self, direction: Direction, percentile: float = 25.0, *, min_peers: int = 4, warmup_steps: int = 0
    ) -> None:
        self._direction = _check_direction(direction)
        if not 0.0 <= percentile <= 100.0:  # also refuses NaN
            raise ValueError(f"percentile must be between 0 and 100 inclusive, but got {percentile=}.")
        self._percentile = percentile
        self._min_peers = _check_min_peers(min_peers)
        self._warmup_steps = _check_warmup_steps(warmup_steps)

    def _judge(self, trial: FrozenTrial, value: float, peers: list[tuple[FrozenTrial, float]]) -> bool:
        values = np.array([v for _, v in peers] + [value], dtype=float)
        if self._direction == "max":
            return value < float(np.nanpercentile(values, 100.0 - self._percentile))
        return value > float(np.nanpercentile(values, self._percentile))


class MedianPruner(PercentilePruner):
    """:class:`PercentilePruner` at 50: prune a trial worse than the median of its rung."""

    def __init__(self, direction: Direction, *, min_peers: int = 4, warmup_steps: int = 0) -> None:
        super().__init__(direction, 50.0, min_peers=min_peers, warmup_steps=warmup_steps)


class SuccessiveHalvingPruner(_RungPruner):
    """Asynchronous successive halving (ASHA, Li et al. 2020) on the rung values.

    At its latest rung ``s > warmup_steps``, of the ``n >= min_peers`` trials measured at ``s`` (itself included),
    keep the trial only if it is among the best ``ceil(n / reduction_factor)``; a trial tying the cut-off value is
    kept. Asynchronous: the trial is judged against whoever has reached ``s`` so far, without waiting for a full
    rung.
    """

    def __init__(
        self, direction: Direction, *, reduction_factor: int = 2, min_peers: int = 4, warmup_steps: int = 0
    ) -> None:
        self._direction = _check_direction(direction)
        self._reduction_factor = _check_reduction_factor(reduction_factor)
        self._min_peers = _check_min_peers(min_peers)
        self._warmup_steps = _check_warmup_steps(warmup_steps)

    def _judge(self, trial: FrozenTrial, value: float, peers: list[tuple[FrozenTrial, float]]) -> bool:
        others = [v for _, v in peers]
        return not _in_top_fraction(value, others, self._reduction_factor, _sign(self._direction))


class HyperbandPruner(BasePruner):
    """Hyperband (Li et al. 2018): ``n_brackets`` successive-halving brackets that differ in how long a trial trains
    before it can first be pruned, hedging against rung metrics that rank trials badly early on.

    A trial's bracket is ``b = trial.number % n_brackets`` (numbers are assigned in order, so brackets fill evenly).
    A trial in bracket ``b`` is not pruned at its first ``b`` rungs (counted over its own recorded steps, so at the
    rung with index ``i`` it can be pruned once ``i >= b``): bracket 0 prunes from the first rung, like plain ASHA,
    bracket 2 lets every trial reach its third rung. From then on it is judged by the successive-halving rule
    against the trials of its own bracket only, which have had the same grace; ``min_peers`` counts that bracket's
    trials, so each bracket needs its own evidence before it prunes.
    """

    def __init__(
        self, direction: Direction, *, reduction_factor: int = 3, n_brackets: int = 3, min_peers: int = 4
    ) -> None:
        self._direction = _check_direction(direction)
        self._reduction_factor = _check_reduction_factor(reduction_factor)
        if n_brackets < 1:
            raise ValueError(f"n_brackets must be at least 1, but got {n_brackets=}.")
        self._n_brackets = n_brackets
        self._min_peers = _check_min_peers(min_peers)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        latest = _latest(trial)
        if latest is None:
            return False
        index, step, value = latest
        bracket = trial.number % self._n_brackets
        if index < bracket:
            return False
        if not math.isfinite(value):
            return True
        others = [v for peer, v in _peers_at(study, trial, step) if peer.number % self._n_brackets == bracket]
        if len(others) + 1 < self._min_peers:
            return False
        return not _in_top_fraction(value, others, self._reduction_factor, _sign(self._direction))


_FACTORIES: dict[str, Callable[..., BasePruner]] = {
    "pareto": ParetoPruner,
    "median": MedianPruner,
    "percentile": PercentilePruner,
    "successive_halving": SuccessiveHalvingPruner,
    "hyperband": HyperbandPruner,
}


def make_pruner(name: str, direction: str, **options: Any) -> BasePruner | None:
    """The pruner called ``name`` (one of ``PRUNERS``) for a rung metric with ``direction``, built with
    ``options`` (its keyword arguments); None for ``"none"``. An unknown name or option is a ValueError."""
    checked = _check_direction(direction)
    if name == "none":
        if options:
            raise ValueError(f"pruner 'none' takes no options, but got {', '.join(sorted(options))}.")
        return None
    if name not in _FACTORIES:
        raise ValueError(f"unknown pruner {name!r}; known: {', '.join(PRUNERS)}.")
    factory = _FACTORIES[name]
    accepted = [p for p in inspect.signature(factory).parameters if p != "direction"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"pruner {name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(accepted)}."
        )
    return factory(checked, **options)
