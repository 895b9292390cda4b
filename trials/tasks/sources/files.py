"""User data in ``csv`` / ``jsonl`` files: one file per split (``task.files``), or a lone train file that validation
and test are cut from by ``task.split_seed``. Columns are named in space.yaml by role; the task type reads them."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from space.config import TaskSpec
from trials.tasks.base import DataError, TaskData
from trials.tasks.interface import TaskKind
from trials.tasks.sources.rows import Row, Table, UserTables, columns_of
from trials.tasks.tokenizers import Tokenizer
from trials.tasks.types.classification import label_names


def read_table(path: Path, as_text: bool = False) -> list[dict[str, Any]]:
    """The rows of a CSV or JSON(L) file; ``as_text`` reads every CSV column as text (None where a cell is empty)
    instead of letting pandas guess numbers."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    from datasets import Features, Value, load_dataset

    kind = "json" if path.suffix in (".jsonl", ".json") else "csv"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = csv.reader(f) if kind == "csv" else (line for line in f if line.strip())
            head = list(itertools.islice(lines, 2))
        if len(head) < (2 if kind == "csv" else 1):
            return []  # datasets refuses a file without rows; the caller's "no rows" error names the split instead
        features = Features({c: Value("string") for c in head[0]}) if as_text and kind == "csv" else None
        return list(load_dataset(kind, data_files=str(path), split="train", features=features))
    except Exception as exc:  # datasets raises many types; the path is what the user needs
        raise DataError(f"could not read {path} as {kind}: {exc}") from exc


def read_tables(files: Mapping[str, str], seed: int, as_text: bool) -> UserTables:
    """The rows of each split's file (``as_text``: every CSV cell as text)."""
    tables = {}
    for k, path in files.items():
        where = f"task.files.{k} ({path})"
        tables[k] = Table(where, [Row(where, i, r) for i, r in enumerate(read_table(Path(path), as_text=as_text))])

    def cut_where(split: str) -> str:
        return f"task.files.{split} (cut from {files['train']} by split_seed {seed})"

    return UserTables(tables, key=lambda split: f"task.files.{split}", cut_where=cut_where, seed=seed)


def load_files_task(name: str, kind: TaskKind, files: Mapping[str, str], columns: Mapping[str, str | Sequence[str]],
                    tok: Tokenizer, max_length: int, seed: int = 0) -> TaskData:
    """A task of type ``kind`` from CSV/JSONL ``files`` (``train``, optionally ``validation`` and ``test``: a missing
    split is cut from train by ``seed``, 10% each) with ``columns`` by role (a role not in it is read from the column
    of its own name)."""
    if "train" not in files:
        raise DataError("task.files: a 'train' file is required")
    return kind.from_tables(name, read_tables(files, seed, kind.reads_text_cells), columns, tok, max_length)


class Files:
    inputs = "text"

    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        tok = tokenizer()
        return load_files_task(task.name, kind, {str(k): v for k, v in task.files.items()}, columns_of(task), tok,
                               task.max_length, task.split_seed)

    def class_names(self, task: TaskSpec) -> list[str]:
        """The sorted labels of the whole train file: rows held out of a lone train file for validation and test must
        have labels the rest has, so they are those of the training rows."""
        label = task.column("label")
        assert isinstance(label, str)  # only choices may be a list (checked on validation)
        return label_names(read_table(Path(task.files["train"])), label)

    def input_length(self, task: TaskSpec) -> int:
        return task.max_length


SOURCE = Files()
