"""Mini-batches of a split for training, and the split in order for measuring it; a multiple-choice example is a
question with all its choice rows, so a batch holds every choice of the questions it draws."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trials.tasks.base import Batch, Split


def _rows(split: Split, rows: torch.Tensor) -> Batch:
    lengths = split.lengths[rows]
    out: list[torch.Tensor] = [split.ids[rows, : int(lengths.max())], lengths, split.labels[rows]]
    if split.starts is not None:
        out.append(split.starts[rows])
    if split.groups is not None:
        out.append(split.groups[rows])
    return tuple(out)


def batches(split: Split, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless shuffled mini-batches of ``batch_size`` examples, reshuffled every epoch."""
    n = split.num_examples
    members = _question_rows(split) if split.groups is not None else None
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - (n % batch_size if n > batch_size else 0), batch_size):
            picked = order[i : i + batch_size]
            rows = picked if members is None else torch.cat([members[int(q)] for q in picked])
            yield _rows(split, rows)


def _question_rows(split: Split) -> list[torch.Tensor]:
    assert split.groups is not None
    counts = torch.bincount(split.groups).tolist()
    firsts = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]]
    return [torch.arange(f, f + c) for f, c in zip(firsts, counts, strict=True)]


def chunks(split: Split, batch_size: int) -> Iterator[Batch]:
    """The split in order, ``batch_size`` examples at a time (whole questions for multiple choice)."""
    if split.groups is None:
        for i in range(0, len(split), batch_size):
            yield _rows(split, torch.arange(i, min(i + batch_size, len(split))))
        return
    members = _question_rows(split)
    for i in range(0, len(members), batch_size):
        yield _rows(split, torch.cat(members[i : i + batch_size]))


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return tuple(t.to(device) for t in batch)
