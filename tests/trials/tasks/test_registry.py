"""The task registry lists every task type and every task name space.yaml accepts, and refuses any other by name."""

from __future__ import annotations

from typing import get_args

import pytest

from space.config import TASK_TYPES as SPACE_TASK_TYPES
from space.config import TaskSpec
from trials.tasks.registry import SOURCES, TASK_TYPES, source, task_type


def test_every_task_type_of_the_space_has_one_module_in_the_registry():
    assert set(TASK_TYPES) == set(SPACE_TASK_TYPES)
    for name, kind in TASK_TYPES.items():
        assert kind.name == name and kind.eval_batch_size > 0


def test_every_task_name_of_the_space_has_a_source():
    names = get_args(TaskSpec.model_fields["name"].annotation)
    assert set(SOURCES) == set(names)
    assert all(SOURCES[n].inputs in ("text", "pixels") for n in names)


def test_an_unknown_task_type_or_source_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="task type 'regression' is not one of classification, causal_lm"):
        task_type("regression")
    with pytest.raises(ValueError, match="task.name: 'parquet' is not one of digits"):
        source("parquet")
