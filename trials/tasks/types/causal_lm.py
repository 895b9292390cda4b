"""``causal_lm``: supervised fine-tuning on prompt/response pairs. The loss is the mean negative log-likelihood per
response token (the prompt's tokens are context only); the metrics are ``loss`` (nats per response token over the
whole split), ``perplexity`` (its exp), and with ``task.max_new_tokens`` > 0 ``exact_match``: greedy generation from
each of the split's first ``task.exact_match_examples`` prompts, compared with the reference response (stripped of
surrounding whitespace). The model is the causal LM itself (``LanguageModel``), which multiple choice scores with too.

User rows have ``prompt``/``response`` columns, or Alpaca's ``instruction``/``output`` with ``input`` optional.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from space.config import TaskSpec, TaskType
from trials.models.backbone import OnBackbone
from trials.tasks.base import Batch, DataError, Split, TaskData, make_split
from trials.tasks.batching import chunks, to_device
from trials.tasks.interface import Inputs
from trials.tasks.sources.rows import Row, UserTables, cut_missing_splits, one_column
from trials.tasks.tokenizers import Tokenizer

LMExample = tuple[str, str]  # (prompt, response)
DEFAULT_NEW_TOKENS = 64  # what trials.predict generates when neither the command nor the task says


class LanguageModel(OnBackbone):
    """The causal LM itself, for ``causal_lm`` and ``multiple_choice`` tasks: no task head, the model's own
    (frozen, usually tied) output embeddings predict the next token."""

    head: nn.Module | None = None

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, V] next-token logits at every position."""
        return self.logits(self.hidden(ids, lengths))

    def continuation_logprobs(self, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood of each row's continuation ``ids[i, starts[i]:lengths[i]]`` given what precedes it.

        Returns ``(summed log-probability [B], continuation token count [B])``. Only the positions that predict a
        continuation token go through the output embeddings, so a large vocabulary costs [tokens, V], not [B, L, V].
        """
        lengths, starts = lengths.to(ids.device), starts.to(ids.device)
        hidden = self.hidden(ids, lengths)  # [B, L, D]
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L]
        predicts = (pos >= starts[:, None] - 1) & (pos < lengths[:, None] - 1)  # position t predicts ids[t + 1]
        rows, cols = predicts.nonzero(as_tuple=True)  # [T]
        logits = self.logits(hidden[rows, cols]).float()  # [T, V]
        token_lp = logits.log_softmax(-1).gather(1, ids[rows, cols + 1][:, None])[:, 0]  # [T]
        summed = torch.zeros(ids.shape[0], device=ids.device, dtype=token_lp.dtype).index_add(0, rows, token_lp)
        return summed, predicts.sum(1)


# --- rows ------------------------------------------------------------------------------------------------------


def make_lm_split(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, where: str
                  ) -> tuple[Split, int]:
    """causal_lm rows from (prompt ids, response ids) pairs; returns the split and how many rows were truncated.

    A row longer than ``max_length`` keeps the end of its prompt (the part next to the response) and the start of
    its response, giving the response at least half of ``max_length`` when both are long. A row whose prompt or
    response is empty is an error naming ``where`` and the row.
    """
    rows, starts, truncated = [], [], 0
    for i, (prompt, response) in enumerate(pairs):
        prompt, response = list(prompt), list(response)
        if not prompt:
            raise DataError(f"{where}: row {i}: the prompt is empty after tokenisation")
        if not response:
            raise DataError(f"{where}: row {i}: the response is empty after tokenisation")
        if len(prompt) + len(response) > max_length:
            truncated += 1
            keep_response = min(len(response), max(max_length - len(prompt), max_length // 2))
            keep_prompt = max_length - keep_response
            if keep_prompt < 1:
                raise DataError(f"{where}: row {i}: max_length {max_length} leaves no room for the prompt")
            prompt, response = prompt[-keep_prompt:], response[:keep_response]
        rows.append(prompt + response)
        starts.append(len(prompt))
    if not rows:
        raise DataError(f"{where}: no rows")
    split = make_split(rows, [0] * len(rows), max(len(r) for r in rows))
    return Split(split.ids, split.lengths, split.labels, starts=torch.tensor(starts, dtype=torch.long)), truncated


def encode_lm_split(examples: Sequence[LMExample], tok: Tokenizer, max_length: int, where: str
                    ) -> tuple[Split, int]:
    """Prompts through ``tok.format_prompt``; every response ends with ``tok.eos_id`` (when it has one) so that
    generation learns to stop."""
    eos = [] if tok.eos_id is None else [tok.eos_id]
    pairs = [(tok.encode(tok.format_prompt(p)), tok.encode(r) + eos) for p, r in examples]
    return make_lm_split(pairs, max_length, where)


Encode = Callable[[Sequence[Any], Tokenizer, int, str], tuple[Split, int]]


def lm_task(name: str, task_type: TaskType, splits: Mapping[str, tuple[str, Sequence[Any]]], tok: Tokenizer,
            max_length: int, encode: Encode) -> TaskData:
    """A task of the language-model types from ``{split: (where, examples)}`` encoded by ``encode``, with a note for
    every split in which rows were truncated."""
    built: dict[str, Split] = {}
    notes = []
    for k, (where, examples) in splits.items():
        built[k], truncated = encode(examples, tok, max_length, where)
        if truncated:
            notes.append(f"{where}: {truncated} of {len(built[k])} rows longer than max_length {max_length} "
                         "were truncated")
    return TaskData(name, 0, built["train"], built["validation"], built["test"], type=task_type, decode=tok.decode,
                    notes=tuple(notes))


def user_examples(user: UserTables, example: Callable[[Row], Any]) -> dict[str, tuple[str, list[Any]]]:
    """``{split: (where, examples)}`` of user tables (``user.check_rows()`` first), missing validation/test splits
    cut from train by seed."""
    cut = cut_missing_splits({k: t.rows for k, t in user.tables.items()}, user.seed)
    return {k: (user.where(k), [example(r) for r in rows]) for k, rows in cut.items()}


def _lm_roles(row: Row, columns: Mapping[str, str | Sequence[str]]) -> tuple[str, str]:
    """Which causal_lm layout the data has, by the columns of its first training row: (prompt, response) or
    Alpaca's (instruction, output), with ``input`` optional."""
    missing = {}
    for roles in (("prompt", "response"), ("instruction", "output")):
        missing[roles] = [c for c in (one_column(columns, r) for r in roles) if c not in row.values]
        if not missing[roles]:
            return roles
    (pr, p_missing), (io, i_missing) = missing.items()
    raise DataError(f"{row.where}: row {row.index}: neither {'/'.join(pr)} columns (missing {p_missing}) nor "
                    f"{'/'.join(io)} columns (missing {i_missing}); its columns: {sorted(row.values)}")


def _lm_example(row: Row, columns: Mapping[str, str | Sequence[str]], roles: tuple[str, str]) -> LMExample:
    prompt = row.text(one_column(columns, roles[0]))
    response = row.text(one_column(columns, roles[1]))
    if roles[0] == "instruction":
        extra_column = one_column(columns, "input")
        extra = row.values.get(extra_column)
        if extra is not None and not isinstance(extra, str):
            raise row.error(extra_column, f"expected text, got {extra!r}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    return prompt, response


# --- generation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(model: LanguageModel, prompts: list[torch.Tensor], max_new_tokens: int, eos_id: int | None,
                    device: torch.device | str = "cpu", precision_ctx: Any = None) -> list[list[int]]:
    """Greedy continuations of each prompt (1-D id tensors), at most ``max_new_tokens`` each, stopping after
    ``eos_id`` (not included). All prompts advance together: one forward pass of the whole right-padded batch per
    new token, without a generation cache (every PEFT method supports that path; some refuse cached decoding), and one
    read of the device per token (whether any row goes on, and the longest row)."""
    import contextlib

    ctx = precision_ctx or contextlib.nullcontext
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    buf = torch.zeros(n, int(lengths.max()) + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p.to(device)
    starts = lengths.clone()  # [n] where each continuation begins
    rows = torch.arange(n, device=device)
    live = torch.ones(n, dtype=torch.bool, device=device)
    width = int(lengths.max())  # the longest row so far
    for _ in range(max_new_tokens):
        with ctx():
            hidden = model.hidden(buf[:, :width], lengths)  # [n, width, D]
            last = hidden[rows, lengths - 1]  # [n, D]
            nxt = model.lm.lm_head(last).argmax(-1)  # [n]
        if eos_id is not None:
            live = live & (nxt != eos_id)  # a row that produced eos stops (eos not kept)
        buf[rows, lengths] = torch.where(live, nxt, buf[rows, lengths])  # a stopped row keeps what it has
        lengths = lengths + live.long()
        any_live, width = torch.stack([live.any().long(), lengths.max()]).tolist()  # one read of the device a token
        if not any_live:
            break
    rows_out, begins, ends = buf.tolist(), starts.tolist(), lengths.tolist()  # one read each, not one per row
    return [rows_out[i][begins[i] : ends[i]] for i in range(n)]


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


class CausalLM:
    name = "causal_lm"
    eval_batch_size = 32
    reads_text_cells = True

    def model(self, lm: Any, num_classes: int, pooling: str) -> OnBackbone:
        return LanguageModel(lm)

    def loss(self, model: nn.Module, batch: Batch, task: TaskSpec) -> torch.Tensor:
        assert isinstance(model, LanguageModel)
        ids, lengths, _, starts = batch
        summed, count = model.continuation_logprobs(ids, lengths, starts)
        return -summed.sum() / count.sum().clamp(min=1)

    def evaluate(self, model: nn.Module, split: Split, data: TaskData, task: TaskSpec, *, eos_id: int | None,
                 device: torch.device | str, precision_ctx: Callable[[], Any], batch_size: int) -> dict[str, float]:
        assert isinstance(model, LanguageModel)
        nll, tokens = 0.0, 0
        for batch in chunks(split, batch_size):
            ids, lengths, _, starts = to_device(batch, device)
            with precision_ctx():
                summed, count = model.continuation_logprobs(ids, lengths, starts)
            nll, tokens = nll - float(summed.sum()), tokens + int(count.sum())
        loss = nll / max(1, tokens)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        if task.max_new_tokens > 0:
            out["exact_match"] = exact_match(model, split, data, task, eos_id, device, precision_ctx)
        return out

    def from_tables(self, name: str, user: UserTables, columns: Mapping[str, str | Sequence[str]], tok: Tokenizer,
                    max_length: int) -> TaskData:
        user.check_rows()
        roles = _lm_roles(user.tables["train"].rows[0], columns)
        splits = user_examples(user, lambda row: _lm_example(row, columns, roles))
        return lm_task(name, "causal_lm", splits, tok, max_length, encode_lm_split)

    def predict(self, model: nn.Module, inputs: list[str], where: list[str], reader: Inputs,
                max_new_tokens: int | None) -> list[dict[str, Any]]:
        """The greedy continuation of each prompt (``max_new_tokens``, else the task's, else 64)."""
        assert isinstance(model, LanguageModel) and reader.tokenizer is not None
        tok = reader.tokenizer
        encoded = [torch.tensor(reader.encode(tok.format_prompt(p), w)) for p, w in zip(inputs, where, strict=True)]
        new = max_new_tokens or reader.task["max_new_tokens"] or DEFAULT_NEW_TOKENS
        generated = greedy_generate(model, encoded, new, tok.eos_id)
        return [{"generated": tok.decode(g)} for g in generated]


TASK_TYPE = CausalLM()
