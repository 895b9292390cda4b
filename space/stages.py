"""The MambaPEFT two-stage recipe as transformations of a space (peft-methods.md section 2).

- Stage 1 ("which methods"): every method the space allows becomes an on/off switch at its smallest size; its
  other searched values, and the searched training values, are fixed at the middle of their range. Only the
  switches (and the model's read-out, ``model.pooling``, when searched) are searched, so the stage's budget goes
  to the choice of methods.
- Stage 2 ("tune the chosen set, maybe drop one"): the methods of stage 1's most accurate trial are on, with the
  ranges the user gave; every other method is off; one categorical ``stage2.drop_method`` may switch one of the
  chosen methods off (MambaPEFT's ``remove_method``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from space.config import SearchSpace, TrialConfig, sample_trial
from space.params import Choices, FloatRange, IntRange, Suggester, is_searched

DROP = "stage2.drop_method"
KEEP_ALL = "none"


def fixed(value: Any) -> Any:
    """A searched value pinned for stage 1: the smallest of an integer range or numeric choices (sizes: rank,
    tokens, states), the (geometric, for log ranges) middle of a float range, the middle of float choices, and
    the first of other choices."""
    if isinstance(value, IntRange):
        return value.low
    if isinstance(value, FloatRange):
        return math.sqrt(value.low * value.high) if value.log else (value.low + value.high) / 2
    if isinstance(value, Choices):
        options = value.choices
        if all(isinstance(v, int) and not isinstance(v, bool) for v in options):
            return min(options)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in options):
            return sorted(options)[len(options) // 2]
        return options[0]
    return value


def _pinned(section: Any, **extra: Any) -> dict[str, Any]:
    data = {name: fixed(getattr(section, name)) for name in type(section).model_fields
            if name != "enabled" and is_searched(getattr(section, name))}
    return {**section.model_dump(), **data, **extra}


def stage1_space(space: SearchSpace) -> SearchSpace:
    methods = {name: _pinned(m, enabled="search") for name, m in space.methods.items() if m.enabled is not False}
    data = _derived(space)
    data.update(methods=methods, training=_pinned(space.training))
    return SearchSpace.model_validate(data)


def _derived(space: SearchSpace) -> dict[str, Any]:
    """The space as data for a stage's space; its enqueued configurations belong to the first stage's study."""
    data = space.model_dump(exclude_unset=True)
    data["search"] = {**data.get("search", {}), "enqueue": []}
    return data


def selected_methods(cfg: TrialConfig) -> list[str]:
    return list(cfg.methods)


def stage2_space(space: SearchSpace, selected: list[str], drop: str = KEEP_ALL) -> SearchSpace:
    methods = {name: {**m.model_dump(), "enabled": name in selected and name != drop}
               for name, m in space.methods.items()}
    data = _derived(space)
    data.update(methods=methods)
    return SearchSpace.model_validate(data)


def stage2_sampler(space: SearchSpace, selected: list[str]) -> Callable[[Suggester], TrialConfig]:
    """Samples a stage-2 trial: first whether to drop one chosen method, then the rest of the space."""
    spaces = {drop: stage2_space(space, selected, drop) for drop in [KEEP_ALL, *selected]}

    def sample(trial: Suggester) -> TrialConfig:
        drop = trial.suggest_categorical(DROP, [KEEP_ALL, *selected]) if len(selected) > 1 else KEEP_ALL
        return sample_trial(spaces[drop], trial)

    return sample
