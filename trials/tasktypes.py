"""What each task type trains on and measures: mini-batches, the training loss and the split metrics.

- ``classification``: cross-entropy of the head's logits; metric ``accuracy``.
- ``causal_lm``: mean negative log-likelihood per response token (the prompt's tokens are context only); metrics
  ``loss`` (nats per response token over the whole split), ``perplexity`` (its exp), and with
  ``task.max_new_tokens`` > 0 ``exact_match``: greedy generation from each of the split's first
  ``task.exact_match_examples`` prompts, compared with the reference response (stripped of surrounding whitespace).
- ``multiple_choice``: each choice's score is the log-likelihood of its tokens given the question, summed or divided
  by its token count (``task.choice_scoring``); the prediction is the best-scoring choice; metric ``accuracy``.
  Training is cross-entropy over a question's choice scores (the scores act as the logits of a softmax over its
  choices), so the model learns to rank the right choice first, the way it is evaluated.

The metrics come back without a split prefix; ``trials.run`` names them ``val_*`` and ``test_*`` (space/metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from space.config import TaskSpec
from trials.data import Split, TaskData
from trials.model import LanguageModel

Batch = tuple[torch.Tensor, ...]  # ids, lengths, labels[, starts[, groups]], rows of one mini-batch


def _rows(split: Split, rows: torch.Tensor) -> Batch:
    lengths = split.lengths[rows]
    out: list[torch.Tensor] = [split.ids[rows, : int(lengths.max())], lengths, split.labels[rows]]
    if split.starts is not None:
        out.append(split.starts[rows])
    if split.groups is not None:
        out.append(split.groups[rows])
    return tuple(out)


def batches(split: Split, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless shuffled mini-batches of ``batch_size`` examples, reshuffled every epoch. A multiple-choice example
    is a question with all its choice rows, so a batch holds every choice of the questions it draws."""
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


def choice_matrix(scores: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row choice scores -> ``[questions, max choices]`` (missing choices at -inf) and each question's answer.

    Rows of a question are next to each other in choice order (``trials.data.Split``)."""
    _, local = torch.unique_consecutive(groups, return_inverse=True)  # [n] question index within the batch
    n_q = int(local.max()) + 1
    starts = torch.zeros(n_q, dtype=torch.long, device=groups.device).scatter_reduce(
        0, local, torch.arange(len(groups), device=groups.device), reduce="amin", include_self=False)
    slot = torch.arange(len(groups), device=groups.device) - starts[local]  # choice position within its question
    matrix = scores.new_full((n_q, int(slot.max()) + 1), -math.inf)
    matrix[local, slot] = scores
    answer = torch.zeros(n_q, dtype=torch.long, device=groups.device)
    right = labels == 1
    answer[local[right]] = slot[right]
    return matrix, answer


def _choice_scores(model: LanguageModel, batch: Batch, scoring: str) -> torch.Tensor:
    ids, lengths, _, starts, _ = batch
    summed, count = model.continuation_logprobs(ids, lengths, starts)
    return summed / count.clamp(min=1) if scoring == "mean" else summed


def train_loss(model: nn.Module, batch: Batch, task: TaskSpec) -> torch.Tensor:
    """The loss of one mini-batch (already on the model's device), in fp32."""
    kind = task.task_type
    if kind == "classification":
        ids, lengths, labels = batch
        return nn.functional.cross_entropy(model(ids, lengths).float(), labels)
    assert isinstance(model, LanguageModel)
    if kind == "causal_lm":
        ids, lengths, _, starts = batch
        summed, count = model.continuation_logprobs(ids, lengths, starts)
        return -summed.sum() / count.sum().clamp(min=1)
    matrix, answer = choice_matrix(_choice_scores(model, batch, task.choice_scoring), batch[4], batch[2])
    return nn.functional.cross_entropy(matrix, answer)


def _chunks(split: Split, batch_size: int) -> Iterator[Batch]:
    """The split in order, ``batch_size`` examples at a time (whole questions for multiple choice)."""
    if split.groups is None:
        for i in range(0, len(split), batch_size):
            yield _rows(split, torch.arange(i, min(i + batch_size, len(split))))
        return
    members = _question_rows(split)
    for i in range(0, len(members), batch_size):
        yield _rows(split, torch.cat(members[i : i + batch_size]))


def _to(batch: Batch, device: torch.device | str) -> Batch:
    return tuple(t.to(device) for t in batch)


@torch.no_grad()
def evaluate_split(model: nn.Module, split: Split, data: TaskData, task: TaskSpec, *, eos_id: int | None,
                   device: torch.device | str = "cpu", precision_ctx: Any = None, batch_size: int | None = None
                   ) -> dict[str, float]:
    """The task type's metrics on ``split`` (module docstring), unprefixed: ``{"accuracy": ...}`` or
    ``{"loss": ..., "perplexity": ...[, "exact_match": ...]}``. ``precision_ctx`` makes the forward pass's
    autocast context (``trials.run.forward_precision``). ``batch_size``: examples per forward pass, 128 rows for
    classification and 32 examples otherwise by default."""
    import contextlib

    ctx = precision_ctx or contextlib.nullcontext
    batch_size = batch_size or (128 if task.task_type == "classification" else 32)
    was_training = model.training
    model.eval()
    try:
        kind = task.task_type
        if kind == "classification":
            correct = 0
            for batch in _chunks(split, batch_size):
                ids, lengths, labels = _to(batch, device)
                with ctx():
                    correct += int((model(ids, lengths).argmax(-1) == labels).sum())
            return {"accuracy": correct / max(1, len(split))}
        assert isinstance(model, LanguageModel)
        if kind == "multiple_choice":
            correct = 0
            for batch in _chunks(split, batch_size):
                batch = _to(batch, device)
                with ctx():
                    matrix, answer = choice_matrix(_choice_scores(model, batch, task.choice_scoring), batch[4],
                                                   batch[2])
                correct += int((matrix.argmax(1) == answer).sum())
            return {"accuracy": correct / max(1, split.num_examples)}
        nll, tokens = 0.0, 0
        for batch in _chunks(split, batch_size):
            ids, lengths, _, starts = _to(batch, device)
            with ctx():
                summed, count = model.continuation_logprobs(ids, lengths, starts)
            nll, tokens = nll - float(summed.sum()), tokens + int(count.sum())
        loss = nll / max(1, tokens)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if task.max_new_tokens > 0:
            out["exact_match"] = exact_match(model, split, data, task, eos_id, device, ctx)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def greedy_generate(model: LanguageModel, prompts: list[torch.Tensor], max_new_tokens: int, eos_id: int | None,
                    device: torch.device | str = "cpu", precision_ctx: Any = None) -> list[list[int]]:
    """Greedy continuations of each prompt (1-D id tensors), at most ``max_new_tokens`` each, stopping after
    ``eos_id`` (not included). All prompts advance together: one forward pass of the whole right-padded batch per
    new token, without a generation cache (every PEFT method supports that path; some refuse cached decoding)."""
    import contextlib

    ctx = precision_ctx or contextlib.nullcontext
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    buf = torch.zeros(n, int(lengths.max()) + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p.to(device)
    out: list[list[int]] = [[] for _ in range(n)]
    live = torch.ones(n, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        with ctx():
            hidden = model.hidden(buf[:, :width], lengths)  # [n, width, D]
            last = hidden[torch.arange(n, device=device), lengths - 1]  # [n, D]
            nxt = model.lm.lm_head(last).argmax(-1)  # [n]
        for i in live.nonzero()[:, 0].tolist():
            token = int(nxt[i])
            if eos_id is not None and token == eos_id:
                live[i] = False
                continue
            out[i].append(token)
            buf[i, lengths[i]] = token
        lengths = lengths + live.long()
        if not bool(live.any()):
            break
    return out


def exact_match(model: LanguageModel, split: Split, data: TaskData, task: TaskSpec, eos_id: int | None,
                device: torch.device | str, precision_ctx: Any) -> float:
    """Share of the first ``task.exact_match_examples`` rows whose greedy continuation, decoded, equals the
    reference response (both stripped of surrounding whitespace)."""
    if data.decode is None:
        raise ValueError(f"task {data.name!r}: exact match needs a tokenizer that decodes")
    assert split.starts is not None
    n = min(len(split), task.exact_match_examples)
    prompts = [split.ids[i, : int(split.starts[i])] for i in range(n)]
    generated = greedy_generate(model, prompts, task.max_new_tokens, eos_id, device, precision_ctx)
    hits = 0
    for i, tokens in enumerate(generated):
        reference = split.ids[i, int(split.starts[i]) : int(split.lengths[i])].tolist()
        if eos_id is not None and reference and reference[-1] == eos_id:
            reference = reference[:-1]
        hits += int(data.decode(tokens).strip() == data.decode(reference).strip())
    return hits / max(1, n)
