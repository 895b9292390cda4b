"""``classification``: a linear head on the pooled hidden state; the loss is cross-entropy of its logits, the metric
``accuracy``. User rows name a ``text`` and a ``label`` column; the classes are the sorted labels of the training
rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from space.config import TaskSpec
from trials.models.backbone import OnBackbone
from trials.tasks.base import Batch, DataError, Split, TaskData, make_split
from trials.tasks.batching import chunks, to_device
from trials.tasks.interface import Inputs
from trials.tasks.sources.rows import UserTables, cut_missing_splits, one_column
from trials.tasks.tokenizers import Tokenizer


class SequenceClassifier(OnBackbone):
    """A base model with a linear head on the hidden state at the last real position (or their mean).

    Right padding is assumed: with a causal model the last real position has seen the whole example and
    padded positions after it cannot leak into it.
    """

    head: nn.Linear

    def __init__(self, lm: Any, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"model.pooling: {pooling!r} is not one of 'last', 'mean'")
        self.lm = lm
        self.pooling = pooling
        hidden = lm.config.hidden_size
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.pooled(ids, lengths)  # [B, D]
        return self.head(hidden)  # [B, classes]

    def pooled(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        states = self.hidden(ids, lengths)  # [B, L, D]
        # Every index and mask is built on the states' device: `lengths` may come from the CPU side of a batch.
        lengths = lengths.to(states.device)
        if self.pooling == "last":
            idx = (lengths - 1).clamp(min=0)
            return states[torch.arange(states.shape[0], device=states.device), idx]  # [B, D]
        positions = torch.arange(ids.shape[1], device=states.device)
        mask = (positions[None, :] < lengths[:, None]).to(states.dtype)  # [B, L]
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]


def rows_to_split(rows: Sequence[dict[str, Any]], where: str, text_column: str, label_column: str,
                  label_index: dict[str, int], tok: Tokenizer, max_length: int) -> Split:
    seqs, labels = [], []
    for i, row in enumerate(rows):
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(f"{where}: row {i} has no column {col!r} (columns: {sorted(row)})")
        text = row[text_column]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: row {i} column {text_column!r}: expected non-empty text, got {text!r}")
        key = str(row[label_column])
        if key not in label_index:
            raise DataError(f"{where}: row {i} label {key!r} does not occur in the training split")
        seqs.append(tok.encode(text))
        labels.append(label_index[key])
    return make_split(seqs, labels, max_length)


def label_names(rows: Sequence[dict[str, Any]], label_column: str) -> list[str]:
    """The classes of a task whose training rows are ``rows``, in class-index order."""
    return sorted({str(r.get(label_column)) for r in rows})


class Classification:
    name = "classification"
    eval_batch_size = 128
    reads_text_cells = False  # a label column of numbers keeps pandas' reading of them

    def model(self, lm: Any, num_classes: int, pooling: str) -> OnBackbone:
        return SequenceClassifier(lm, num_classes, pooling)

    def loss(self, model: nn.Module, batch: Batch, task: TaskSpec) -> torch.Tensor:
        ids, lengths, labels = batch
        return nn.functional.cross_entropy(model(ids, lengths).float(), labels)

    def evaluate(self, model: nn.Module, split: Split, data: TaskData, task: TaskSpec, *, eos_id: int | None,
                 device: torch.device | str, precision_ctx: Callable[[], Any], batch_size: int) -> dict[str, float]:
        correct = 0
        for batch in chunks(split, batch_size):
            ids, lengths, labels = to_device(batch, device)
            with precision_ctx():
                correct += int((model(ids, lengths).argmax(-1) == labels).sum())
        return {"accuracy": correct / max(1, len(split))}

    def from_tables(self, name: str, user: UserTables, columns: Mapping[str, str | Sequence[str]], tok: Tokenizer,
                    max_length: int) -> TaskData:
        """Splits cut from train when missing (10% each, by seed); the classes are the training rows' labels."""
        text, label = one_column(columns, "text"), one_column(columns, "label")
        tables = cut_missing_splits({k: [r.values for r in t.rows] for k, t in user.tables.items()}, user.seed)
        for k, rows in tables.items():
            if not rows:
                raise DataError(f"{user.key(k)}: no rows")
        names = label_names(tables["train"], label)
        index = {n: i for i, n in enumerate(names)}
        splits = {k: rows_to_split(tables[k], user.key(k), text, label, index, tok, max_length)
                  for k in ("train", "validation", "test")}
        return TaskData(name, len(names), splits["train"], splits["validation"], splits["test"])

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], where: list[str], reader: Inputs,
                max_new_tokens: int | None) -> list[dict[str, Any]]:
        """The label and its probability (and every class's) of each input."""
        ids, lengths = pad([reader.encode(t, w) for t, w in zip(inputs, where, strict=True)])
        probs = model(ids, lengths).float().softmax(-1)  # [B, classes]
        labels = reader.task["labels"] or [str(c) for c in range(probs.shape[1])]
        return [{"label": labels[int(p.argmax())], "probability": float(p.max()),
                 "probabilities": dict(zip(labels, p.tolist(), strict=True))} for p in probs]


def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and their [B] lengths."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


TASK_TYPE = Classification()
