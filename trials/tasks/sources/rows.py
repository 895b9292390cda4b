"""User rows as every user source hands them to a task type: one table per split, each row with where it came from.

Row numbers in errors count from 0 in the file or dataset split the row came from, as ``datasets`` numbers them; a
CSV file's row 0 is the line after the header.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from space.config import COLUMN_ROLES, TaskSpec
from trials.tasks.base import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    where: str  # the file or dataset split the row came from
    index: int
    values: dict[str, Any]

    def error(self, column: str, problem: str) -> DataError:
        return DataError(f"{self.where}: row {self.index}: column {column!r}: {problem}")

    def get(self, column: str) -> Any:
        if column not in self.values:
            raise self.error(column, f"missing (columns: {sorted(self.values)})")
        return self.values[column]

    def text(self, column: str) -> str:
        return self.check_text(column, self.get(column))

    def check_text(self, column: str, value: Any, what: str = "") -> str:
        """``value`` (read from ``column``) when it is text that is not blank."""
        if not isinstance(value, str) or not value.strip():
            raise self.error(column, f"{what}expected non-empty text, got {value!r}")
        return value


@dataclass(frozen=True)
class Table:
    where: str  # the split's name and source, for errors that are not about one row, and for notes
    rows: list[Row]


@dataclass(frozen=True)
class UserTables:
    """The splits a user source read: ``tables`` by our split name (``train``, maybe ``validation``/``test``);
    ``key(split)`` is the space.yaml key a split is named by in short messages (``task.files.train``), and
    ``cut_where(split)`` names a split cut from train."""

    tables: dict[str, Table]
    key: Callable[[str], str]
    cut_where: Callable[[str], str]
    seed: int

    def check_rows(self) -> None:
        """An error naming the first table without rows."""
        for table in self.tables.values():
            if not table.rows:
                raise DataError(f"{table.where}: no rows")

    def where(self, split: str) -> str:
        return self.tables[split].where if split in self.tables else self.cut_where(split)


def cut_missing_splits(tables: Mapping[str, list[T]], seed: int) -> dict[str, list[T]]:
    """When validation or test is missing, 10% of train each (at least one row) by seed is held out for them; a
    split that was given is kept, and train loses the held-out rows either way."""
    out = dict(tables)
    if "validation" in out and "test" in out:
        return out
    train_rows = out["train"]
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, len(order) // 10)
    held = {"test": [train_rows[i] for i in order[:n_hold]],
            "validation": [train_rows[i] for i in order[n_hold : 2 * n_hold]]}
    for k in ("validation", "test"):
        out.setdefault(k, held[k])
    out["train"] = [train_rows[i] for i in order[2 * n_hold :]]
    return out


def columns_of(task: TaskSpec) -> dict[str, str | list[str]]:
    """The task's columns by role of its type (``TaskSpec.column``)."""
    return {role: task.column(role) for role in COLUMN_ROLES[task.task_type]}


def one_column(columns: Mapping[str, str | Sequence[str]], role: str) -> str:
    column = columns.get(role, role)
    if not isinstance(column, str):
        raise DataError(f"task.columns.{role}: one column name, not {column!r}")
    return column
