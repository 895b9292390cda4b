"""The two interfaces of the task axis.

A task *type* (``trials.tasks.types``) says what a trial trains on a split and measures: the trainable model around
the base model (a head, or the language model itself), the loss of a mini-batch, the split's metrics, how user rows
become a split, and what a saved model predicts. A task *source* (``trials.tasks.sources``) says where a task's rows
come from (a built-in task, CSV/JSONL files, a Hugging Face dataset). ``trials.tasks.registry`` lists both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from space.config import TaskSpec
from trials.models.backbone import OnBackbone
from trials.tasks.base import Batch, Split, TaskData
from trials.tasks.sources.rows import UserTables
from trials.tasks.tokenizers import Tokenizer


@dataclass(frozen=True)
class Inputs:
    """What ``TaskKind.predict`` reads new inputs with: ``encode`` turns one input into ids (and names ``where`` in
    its errors), ``tokenizer`` is the text tokenizer (None for pixel inputs), ``task`` the saved ``task.json``."""

    encode: Callable[[str, str], list[int]]
    tokenizer: Tokenizer | None
    task: Mapping[str, Any]


class TaskKind(Protocol):
    """A task type: one module of ``trials.tasks.types``, registered in ``trials.tasks.registry.TASK_TYPES``."""

    name: str  # a space.config.TaskType
    eval_batch_size: int  # examples per forward pass when measuring a split
    reads_text_cells: bool  # CSV cells are read as text (else pandas may read numbers, as a label column has them)

    def model(self, lm: Any, num_classes: int, pooling: str) -> OnBackbone:
        """The trainable model of a trial around the base causal LM ``lm``."""
        ...

    def loss(self, model: nn.Module, batch: Batch, task: TaskSpec) -> torch.Tensor:
        """The loss of one mini-batch (already on the model's device), in fp32."""
        ...

    def evaluate(self, model: nn.Module, split: Split, data: TaskData, task: TaskSpec, *, eos_id: int | None,
                 device: torch.device | str, precision_ctx: Callable[[], Any], batch_size: int) -> dict[str, float]:
        """The split's metrics, unprefixed (``{"accuracy": ...}``); the model is in eval mode and without grad."""
        ...

    def from_tables(self, name: str, user: UserTables, columns: Mapping[str, str | Sequence[str]], tok: Tokenizer,
                    max_length: int) -> TaskData:
        """A task from user rows (``train``, optionally ``validation`` and ``test``; a missing split is cut from train
        by ``user.seed``), with ``columns`` by role (``space.config.COLUMN_ROLES``)."""
        ...

    def predict(self, model: nn.Module, inputs: list[str], where: list[str], reader: Inputs,
                max_new_tokens: int | None) -> list[dict[str, Any]]:
        """One result per input of a saved model (``trials.predict``)."""
        ...


class TaskSource(Protocol):
    """Where a task's rows come from: one module of ``trials.tasks.sources``, registered by ``task.name`` in
    ``trials.tasks.registry.SOURCES``."""

    inputs: str  # "text", or "pixels" (digits: 64 intensities a line, read without a tokenizer)

    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        """The task's splits, as task type ``kind`` reads them; ``tokenizer()`` makes the model's tokenizer (a source
        that needs none never calls it)."""
        ...

    def class_names(self, task: TaskSpec) -> list[str]:
        """What each class index of a classification task stands for."""
        ...

    def input_length(self, task: TaskSpec) -> int:
        """The longest input a saved model of this task takes (``task.json``'s ``max_length``)."""
        ...
