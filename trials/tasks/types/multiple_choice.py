"""``multiple_choice``: each choice's score is the log-likelihood of its tokens given the question, summed or divided
by its token count (``task.choice_scoring``); the prediction is the best-scoring choice; the metric ``accuracy``.
Training is cross-entropy over a question's choice scores (the scores act as the logits of a softmax over its
choices), so the model learns to rank the right choice first, the way it is evaluated.

User rows have a ``question``, ``choices`` (one list-valued column, or one column per choice) and an ``answer`` (an
index, a letter or the text of a choice).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from space.config import TaskSpec
from trials.models.backbone import OnBackbone
from trials.tasks.base import Batch, DataError, PredictError, Split, TaskData, make_split
from trials.tasks.batching import chunks, to_device
from trials.tasks.interface import Inputs
from trials.tasks.sources.rows import Row, UserTables, one_column
from trials.tasks.tokenizers import Tokenizer
from trials.tasks.types.causal_lm import LanguageModel, lm_task, user_examples

ChoiceExample = tuple[str, list[str], int]  # (question, choices, index of the answer)


def make_choice_split(questions: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], int]], max_length: int,
                      where: str) -> tuple[Split, int]:
    """multiple_choice rows from (question ids, [choice ids, ...], answer index) triples; returns the split and how
    many rows were truncated (the question loses its start, so the choice stays whole next to it).

    An answer outside the choices, fewer than two choices, or an empty question or choice is an error naming
    ``where`` and the row.
    """
    rows, starts, groups, labels, truncated = [], [], [], [], 0
    for q, (question, choices, answer) in enumerate(questions):
        question = list(question)
        if not question:
            raise DataError(f"{where}: row {q}: the question is empty after tokenisation")
        if len(choices) < 2:
            raise DataError(f"{where}: row {q}: needs at least 2 choices, got {len(choices)}")
        if not 0 <= answer < len(choices):
            raise DataError(f"{where}: row {q}: answer index {answer} is outside the {len(choices)} choices")
        for c, choice in enumerate(choices):
            choice = list(choice)
            if not choice:
                raise DataError(f"{where}: row {q}: choice {c} is empty after tokenisation")
            if len(choice) >= max_length:
                raise DataError(f"{where}: row {q}: choice {c} has {len(choice)} tokens, max_length is {max_length}")
            context = question
            if len(question) + len(choice) > max_length:
                truncated += 1
                context = question[-(max_length - len(choice)):]
            rows.append(context + choice)
            starts.append(len(context))
            groups.append(q)
            labels.append(int(c == answer))
    if not rows:
        raise DataError(f"{where}: no rows")
    split = make_split(rows, labels, max(len(r) for r in rows))
    return (Split(split.ids, split.lengths, split.labels, starts=torch.tensor(starts, dtype=torch.long),
                  groups=torch.tensor(groups, dtype=torch.long)), truncated)


def _continuation(choice: str) -> str:
    """A choice is scored as the continuation `` choice`` of its question (lm-evaluation-harness' convention)."""
    return choice if choice[:1].isspace() else " " + choice


def encode_choice_split(examples: Sequence[ChoiceExample], tok: Tokenizer, max_length: int, where: str
                        ) -> tuple[Split, int]:
    """Questions as they are (no chat template: a choice is scored as the text that follows); no eos after a
    choice."""
    rows = [(tok.encode(q), [tok.encode(_continuation(c)) for c in choices], a) for q, choices, a in examples]
    return make_choice_split(rows, max_length, where)


def choice_matrix(scores: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row choice scores -> ``[questions, max choices]`` (missing choices at -inf) and each question's answer.

    Rows of a question are next to each other in choice order (``trials.tasks.base.Split``)."""
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


def choice_scores(model: LanguageModel, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor,
                  scoring: str) -> torch.Tensor:
    summed, count = model.continuation_logprobs(ids, lengths, starts)
    return summed / count.clamp(min=1) if scoring == "mean" else summed


def _choices(row: Row, spec: str | Sequence[str]) -> list[str]:
    """One list-valued column (JSONL, datasets), or one column per choice (CSV)."""
    if not isinstance(spec, str):
        return [row.text(column) for column in spec]
    value = row.get(spec)
    if not isinstance(value, list) or len(value) < 2:
        raise row.error(spec, f"expected a list of at least 2 choices, got {value!r}")
    return [row.check_text(spec, v, f"choice {c}: ") for c, v in enumerate(value)]


def _answer(row: Row, column: str, choices: Sequence[str]) -> int:
    """An index (an int, or a float with no fraction), a digit string, a letter A..Z, or the text of one of the
    choices (a value that reads as both a position and the text of another choice is an error)."""
    value = row.get(column)
    position: int | None = None
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        position = int(value)  # a JSON column with one float in it reads every number as a float
    elif not isinstance(value, str):
        raise row.error(column, f"expected a choice index, letter or choice text, got {value!r}")
    elif value.strip().isascii() and value.strip().isdigit():
        position = int(value)
    elif len(value.strip()) == 1 and "A" <= value.strip() <= "Z":
        position = ord(value.strip()) - ord("A")
    text = choices.index(value) if isinstance(value, str) and value in choices else None
    if position is not None and text is not None and position != text:
        raise row.error(column, f"{value!r} is both the position of choice {position} and the text of choice {text}")
    if position is None and text is None:
        raise row.error(column, f"{value!r} is not a choice index, a letter or one of the choices {choices}")
    answer = position if position is not None else text
    assert answer is not None
    if not 0 <= answer < len(choices):
        raise row.error(column, f"answer {value!r} is outside the {len(choices)} choices")
    return answer


def _choice_example(row: Row, columns: Mapping[str, str | Sequence[str]]) -> ChoiceExample:
    choices = _choices(row, columns.get("choices", "choices"))
    return row.text(one_column(columns, "question")), choices, _answer(row, one_column(columns, "answer"), choices)


def _question(line: str, where: str) -> ChoiceExample:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PredictError(f'{where}: expected a JSON object {{"question": ..., "choices": [...]}}: {exc}') from None
    question, choices = (row.get("question"), row.get("choices")) if isinstance(row, dict) else (None, None)
    if not isinstance(question, str) or not question or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c for c in choices):
        raise PredictError(f'{where}: expected {{"question": text, "choices": [at least 2 texts]}}, got {line[:80]!r}')
    return question, choices, 0  # the answer is what is asked for; 0 fills the slot


class MultipleChoice:
    name = "multiple_choice"
    eval_batch_size = 32
    reads_text_cells = True

    def model(self, lm: Any, num_classes: int, pooling: str) -> OnBackbone:
        return LanguageModel(lm)

    def loss(self, model: nn.Module, batch: Batch, task: TaskSpec) -> torch.Tensor:
        assert isinstance(model, LanguageModel)
        ids, lengths, labels, starts, groups = batch
        matrix, answer = choice_matrix(choice_scores(model, ids, lengths, starts, task.choice_scoring), groups, labels)
        return nn.functional.cross_entropy(matrix, answer)

    def evaluate(self, model: nn.Module, split: Split, data: TaskData, task: TaskSpec, *, eos_id: int | None,
                 device: torch.device | str, precision_ctx: Callable[[], Any], batch_size: int) -> dict[str, float]:
        assert isinstance(model, LanguageModel)
        correct = 0
        for batch in chunks(split, batch_size):
            ids, lengths, labels, starts, groups = to_device(batch, device)
            with precision_ctx():
                matrix, answer = choice_matrix(choice_scores(model, ids, lengths, starts, task.choice_scoring),
                                               groups, labels)
            correct += int((matrix.argmax(1) == answer).sum())
        return {"accuracy": correct / max(1, split.num_examples)}

    def from_tables(self, name: str, user: UserTables, columns: Mapping[str, str | Sequence[str]], tok: Tokenizer,
                    max_length: int) -> TaskData:
        user.check_rows()
        splits = user_examples(user, lambda row: _choice_example(row, columns))
        return lm_task(name, "multiple_choice", splits, tok, max_length, encode_choice_split)

    @torch.no_grad()
    def predict(self, model: nn.Module, inputs: list[str], where: list[str], reader: Inputs,
                max_new_tokens: int | None) -> list[dict[str, Any]]:
        """The chosen choice of each JSON question and its probability (the softmax of the choice scores, the
        distribution training fits)."""
        assert isinstance(model, LanguageModel) and reader.tokenizer is not None
        max_length = reader.task["max_length"]
        questions = [_question(line, w) for line, w in zip(inputs, where, strict=True)]
        try:
            for q, w in zip(questions, where, strict=True):  # one at a time, to name the line training would cut
                if encode_choice_split([q], reader.tokenizer, max_length, w)[1]:
                    raise PredictError(f"{w}: the question and a choice are longer than the task's max_length "
                                       f"{max_length} tokens")
            split, _ = encode_choice_split(questions, reader.tokenizer, max_length, where[0])
        except DataError as exc:
            raise PredictError(str(exc)) from None
        assert split.starts is not None and split.groups is not None
        scores = choice_scores(model, split.ids, split.lengths, split.starts, reader.task["choice_scoring"])
        matrix, _ = choice_matrix(scores, split.groups, split.labels)  # [questions, max choices]
        probs = matrix.softmax(-1)
        out = []
        for (_, choices, _), p in zip(questions, probs, strict=True):
            best = int(p.argmax())
            out.append({"choice": choices[best], "index": best, "probability": float(p[best]),
                        "probabilities": p[: len(choices)].tolist()})
        return out


TASK_TYPE = MultipleChoice()
