"""A Hugging Face dataset (``task.hf_dataset``, from the hub or a local dataset script or directory) loaded through
``datasets``; ``task.hf_splits`` maps our split names to the dataset's."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from space.config import TaskSpec
from trials.tasks.base import DataError, TaskData
from trials.tasks.interface import TaskKind
from trials.tasks.sources.rows import Row, Table, UserTables, columns_of
from trials.tasks.tokenizers import Tokenizer
from trials.tasks.types.classification import label_names


def load_hf_split(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        return list(load_dataset(dataset, config, split=split))
    except Exception as exc:
        raise DataError(f"task.hf_dataset: could not load {dataset!r} split {split!r}: {exc}") from exc


def load_hf_dataset_task(dataset: str, config: str | None, splits: Mapping[str, str], kind: TaskKind,
                         columns: Mapping[str, str | Sequence[str]], tok: Tokenizer, max_length: int, seed: int = 0
                         ) -> TaskData:
    """A task of type ``kind`` from a ``datasets`` dataset; ``splits`` maps ours to the dataset's (``train`` required;
    a missing validation or test split is cut from train by ``seed``)."""
    if "train" not in splits:
        raise DataError("task.hf_splits: a 'train' split is required")
    tables = {}
    for k, theirs in splits.items():
        where = f"task.hf_dataset {dataset!r} split {theirs!r}"
        tables[k] = Table(where, [Row(where, i, r) for i, r in enumerate(load_hf_split(dataset, config, theirs))])

    def cut_where(split: str) -> str:
        return f"task.hf_splits.{split} (cut from {dataset!r} split {splits['train']!r} by split_seed {seed})"

    user = UserTables(tables, key=lambda split: f"task.splits.{split}", cut_where=cut_where, seed=seed)
    return kind.from_tables(dataset, user, columns, tok, max_length)


class HFDataset:
    inputs = "text"

    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        assert task.hf_dataset is not None  # checked when the space was validated
        tok = tokenizer()
        return load_hf_dataset_task(task.hf_dataset, task.hf_config, {str(k): v for k, v in task.hf_splits.items()},
                                    kind, columns_of(task), tok, task.max_length, task.split_seed)

    def class_names(self, task: TaskSpec) -> list[str]:
        label = task.column("label")
        assert isinstance(label, str) and task.hf_dataset is not None  # checked when the config was validated
        return label_names(load_hf_split(task.hf_dataset, task.hf_config, task.hf_splits["train"]), label)

    def input_length(self, task: TaskSpec) -> int:
        return task.max_length


SOURCE = HFDataset()
