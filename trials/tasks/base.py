"""What every task type and task source shares: a split as rows of tokens, a task's data, and their errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from space.config import TaskType
from trials.models.vocab import PAD_ID

Batch = tuple[torch.Tensor, ...]  # ids, lengths, labels[, starts[, groups]], rows of one mini-batch


@dataclass(frozen=True)
class Split:
    """One split as rows of tokens: ``ids`` [n, L] right-padded with PAD_ID, ``lengths`` [n], ``labels`` [n].

    - classification: a row is one example, ``labels`` its class.
    - causal_lm: a row is prompt + response; ``starts`` [n] is where the response begins, and the loss is on the
      response tokens ``ids[i, starts[i]:lengths[i]]`` only. ``labels`` is all zeros.
    - multiple_choice: a row is question + one choice; ``starts`` is where the choice begins, ``groups`` [n] the
      question the row belongs to (0..q-1, a question's rows next to each other, in choice order), and ``labels``
      is 1 on the correct choice's row and 0 elsewhere.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_examples(self) -> int:
        """Examples (questions for multiple_choice, rows otherwise)."""
        return int(self.groups.max().item()) + 1 if self.groups is not None and len(self) else len(self)


@dataclass(frozen=True)
class TaskData:
    name: str
    num_classes: int  # classification: the classes; 0 for causal_lm and multiple_choice (no task head)
    train: Split
    val: Split
    test: Split
    type: TaskType = "classification"
    decode: Callable[[Sequence[int]], str] | None = None  # token ids -> text (causal_lm's exact match)
    notes: tuple[str, ...] = ()  # what loading changed (rows truncated), printed with the trial

    def max_token_id(self) -> int:
        return int(max(s.ids.max().item() for s in (self.train, self.val, self.test)))


class DataError(ValueError):
    """Bad or missing task data; the message names the file, column or value."""


class PredictError(ValueError):
    """An input the saved model cannot take, or a directory that holds no saved model; the message names where."""


def make_split(sequences: Sequence[Sequence[int]], labels: Sequence[int], max_length: int) -> Split:
    n = len(sequences)
    ids = torch.full((n, max_length), PAD_ID, dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, seq in enumerate(sequences):
        seq = list(seq)[:max_length]
        if not seq:
            raise DataError(f"example {i} is empty after tokenisation")
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths[i] = len(seq)
    return Split(ids=ids, lengths=lengths, labels=torch.tensor(list(labels), dtype=torch.long))
