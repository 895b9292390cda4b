"""The one table of task types and task sources, and what a trial asks of them: its data, its model, its loss, its
metrics. A new task type or source is one module of ``trials.tasks.types`` or ``trials.tasks.sources`` plus one line
here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from space.config import ModelSpec, TaskSpec
from trials.models.backbone import OnBackbone
from trials.tasks.base import Batch, Split, TaskData
from trials.tasks.interface import TaskKind, TaskSource
from trials.tasks.sources import digits, files, hf, pydoc, stdlib
from trials.tasks.tokenizers import make_tokenizer
from trials.tasks.types import causal_lm, classification, multiple_choice

TASK_TYPES: dict[str, TaskKind] = {kind.name: kind for kind in (
    classification.TASK_TYPE, causal_lm.TASK_TYPE, multiple_choice.TASK_TYPE)}

# By ``task.name`` (space.config.TaskSpec).
SOURCES: dict[str, TaskSource] = {
    "digits": digits.SOURCE,
    "pydoc_topics": pydoc.SOURCE,
    "stdlib_modules": stdlib.MODULES,
    "stdlib_docstrings": stdlib.DOCSTRINGS,
    "stdlib_functions": stdlib.FUNCTIONS,
    "csv": files.SOURCE,
    "jsonl": files.SOURCE,
    "hf": hf.SOURCE,
}


def task_type(name: str) -> TaskKind:
    if name not in TASK_TYPES:
        raise ValueError(f"task type {name!r} is not one of {', '.join(TASK_TYPES)}")
    return TASK_TYPES[name]


def source(name: str) -> TaskSource:
    if name not in SOURCES:
        raise ValueError(f"task.name: {name!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[name]


def load_task(task: TaskSpec, model: ModelSpec) -> TaskData:
    """The task's splits, read by its source as its type reads them, with the model's tokenizer."""
    return source(task.name).load(task, task_type(task.task_type), lambda: make_tokenizer(model))


def task_model(lm: Any, task_type_name: str, num_classes: int, pooling: str) -> OnBackbone:
    """The trainable model of a trial: a classifier for classification, the language model itself otherwise."""
    return task_type(task_type_name).model(lm, num_classes, pooling)


def train_loss(model: nn.Module, batch: Batch, task: TaskSpec) -> torch.Tensor:
    """The loss of one mini-batch (already on the model's device), in fp32."""
    return task_type(task.task_type).loss(model, batch, task)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, data: TaskData, task: TaskSpec, *, eos_id: int | None,
                   device: torch.device | str = "cpu", precision_ctx: Callable[[], Any] | None = None,
                   batch_size: int | None = None) -> dict[str, float]:
    """The task type's metrics on ``split``, unprefixed: ``{"accuracy": ...}`` or ``{"loss": ..., "perplexity":
    ...[, "exact_match": ...]}``, in eval mode. ``precision_ctx`` makes the forward pass's autocast context
    (``trials.run.forward_precision``). ``batch_size``: examples per forward pass, the task type's own by default
    (128 rows for classification, 32 examples otherwise)."""
    kind = task_type(task.task_type)
    was_training = model.training
    model.eval()
    try:
        return kind.evaluate(model, split, data, task, eos_id=eos_id, device=device,
                             precision_ctx=precision_ctx or contextlib.nullcontext,
                             batch_size=batch_size or kind.eval_batch_size)
    finally:
        model.train(was_training)
