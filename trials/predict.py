"""Run a model saved by ``trials.train`` on new inputs: ``python -m trials.predict OUT texts.txt``.

OUT is what ``trials.train`` wrote (its merged model when it has one, else the base model plus the adapter), or a
merged directory alone. Every non-blank line of the inputs file is one input:
- classification: a text (for ``digits``, an 8x8 image as 64 intensities 0..16, row by row); prints the label and
  its probability, tab-separated (``--json``: every class's probability);
- causal_lm: a prompt; prints the greedy continuation (``--max-new-tokens``, by default the task's or 64);
- multiple_choice: a JSON object ``{"question": ..., "choices": [...]}``; prints the chosen choice and its
  probability (the softmax of the choice scores, the distribution training fits).

An input longer than the task's ``max_length`` is an error naming its file and line, never silently cut.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from space.config import ModelSpec
from trials.data import PIXEL_LEVELS, PIXEL_OFFSET, DataError, Tokenizer, encode_choice_split
from trials.model import LanguageModel, SequenceClassifier
from trials.tasks import make_tokenizer
from trials.tasktypes import choice_matrix, greedy_generate
from trials.train import DIGITS_LENGTH, HEAD_FILE, load_merged, load_trained, read_task

BATCH = 32
DEFAULT_NEW_TOKENS = 64


class PredictError(ValueError):
    """An input the saved model cannot take, or a directory that holds no saved model; the message names where."""


@dataclass
class Predictor:
    """A saved model with what reading its inputs needs: the task description and the tokenizer."""

    model: SequenceClassifier | LanguageModel
    task: dict[str, Any]
    tokenizer: Tokenizer | None  # None: pixel inputs (digits)

    @property
    def task_type(self) -> str:
        return str(self.task["task_type"])

    def predict(self, inputs: list[str], where: list[str] | None = None, max_new_tokens: int | None = None
                ) -> list[dict[str, Any]]:
        """One result per input: ``label``, ``probability`` and ``probabilities`` (classification), ``generated``
        (causal_lm), or ``choice``, ``index``, ``probability`` and ``probabilities`` (multiple_choice). ``where`` names
        each input in errors (``texts.txt:3``)."""
        where = where or [f"input {i}" for i in range(len(inputs))]
        if not inputs:
            raise PredictError("no inputs")
        out: list[dict[str, Any]] = []
        for i in range(0, len(inputs), BATCH):
            chunk, names = inputs[i : i + BATCH], where[i : i + BATCH]
            if self.task_type == "classification":
                out += self._classify(chunk, names)
            elif self.task_type == "causal_lm":
                out += self._generate(chunk, names, max_new_tokens)
            else:
                out += self._choose(chunk, names)
        return out

    def _encode(self, text: str, where: str) -> list[int]:
        if self.tokenizer is None:
            return _pixels(text, where)
        ids = self.tokenizer.encode(text)
        if not ids:
            raise PredictError(f"{where}: empty after tokenisation")
        if len(ids) > self.task["max_length"]:
            raise PredictError(f"{where}: {len(ids)} tokens, longer than the task's max_length "
                               f"{self.task['max_length']}")
        return ids

    @torch.no_grad()
    def _classify(self, texts: list[str], where: list[str]) -> list[dict[str, Any]]:
        ids, lengths = _pad([self._encode(t, w) for t, w in zip(texts, where, strict=True)])
        probs = self.model(ids, lengths).float().softmax(-1)  # [B, classes]
        labels = self.task["labels"] or [str(c) for c in range(probs.shape[1])]
        return [{"label": labels[int(p.argmax())], "probability": float(p.max()),
                 "probabilities": dict(zip(labels, p.tolist(), strict=True))} for p in probs]

    def _generate(self, prompts: list[str], where: list[str], max_new_tokens: int | None) -> list[dict[str, Any]]:
        assert isinstance(self.model, LanguageModel) and self.tokenizer is not None
        tok = self.tokenizer
        encoded = [torch.tensor(self._encode(tok.format_prompt(p), w)) for p, w in zip(prompts, where, strict=True)]
        new = max_new_tokens or self.task["max_new_tokens"] or DEFAULT_NEW_TOKENS
        generated = greedy_generate(self.model, encoded, new, tok.eos_id)
        return [{"generated": tok.decode(g)} for g in generated]

    @torch.no_grad()
    def _choose(self, lines: list[str], where: list[str]) -> list[dict[str, Any]]:
        assert isinstance(self.model, LanguageModel) and self.tokenizer is not None
        questions = [_question(line, w) for line, w in zip(lines, where, strict=True)]
        try:
            for q, w in zip(questions, where, strict=True):  # one at a time, to name the line training would cut
                if encode_choice_split([q], self.tokenizer, self.task["max_length"], w)[1]:
                    raise PredictError(f"{w}: the question and a choice are longer than the task's max_length "
                                       f"{self.task['max_length']} tokens")
            split, _ = encode_choice_split(questions, self.tokenizer, self.task["max_length"], where[0])
        except DataError as exc:
            raise PredictError(str(exc)) from None
        assert split.starts is not None and split.groups is not None
        summed, count = self.model.continuation_logprobs(split.ids, split.lengths, split.starts)
        scores = summed / count.clamp(min=1) if self.task["choice_scoring"] == "mean" else summed
        matrix, _ = choice_matrix(scores, split.groups, split.labels)  # [questions, max choices]
        probs = matrix.softmax(-1)
        out = []
        for (_, choices, _), p in zip(questions, probs, strict=True):
            best = int(p.argmax())
            out.append({"choice": choices[best], "index": best, "probability": float(p[best]),
                        "probabilities": p[: len(choices)].tolist()})
        return out


def _pixels(line: str, where: str) -> list[int]:
    values = line.replace(",", " ").split()
    if len(values) != DIGITS_LENGTH or not all(v.isdigit() and int(v) < PIXEL_LEVELS for v in values):
        raise PredictError(f"{where}: expected {DIGITS_LENGTH} pixel intensities 0..{PIXEL_LEVELS - 1} (an 8x8 image "
                           f"row by row), got {len(values)} values: {line[:60]!r}")
    return [PIXEL_OFFSET + int(v) for v in values]


def _question(line: str, where: str) -> tuple[str, list[str], int]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PredictError(f'{where}: expected a JSON object {{"question": ..., "choices": [...]}}: {exc}') from None
    question, choices = (row.get("question"), row.get("choices")) if isinstance(row, dict) else (None, None)
    if not isinstance(question, str) or not question or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) and c for c in choices):
        raise PredictError(f'{where}: expected {{"question": text, "choices": [at least 2 texts]}}, got {line[:80]!r}')
    return question, choices, 0  # the answer is what is asked for; 0 fills the slot


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and their [B] lengths."""
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, lengths


def load_predictor(path: Path) -> Predictor:
    """The model saved at ``path``: a ``trials.train`` output (its merged model when it has one, else the base model
    with the adapter) or a merged directory alone."""
    if not path.is_dir():
        raise PredictError(f"{path}: no such directory")
    merged = next((d for d in (path / "merged", path) if (d / HEAD_FILE).exists() and (d / "config.json").exists()),
                  None)
    if merged is not None:
        model, task = load_merged(merged), read_task(merged)
        # A merged directory carries the checkpoint's own tokenizer when it had one, and bytes need none.
        tokens = ModelSpec(checkpoint=str(merged), tokenizer="auto")
    elif (path / "adapter").is_dir():
        model, task = load_trained(path), read_task(path)
        tokens = ModelSpec(checkpoint=task["base_checkpoint"], tokenizer=task["tokenizer"])
    else:
        raise PredictError(f"{path}: holds no model saved by trials.train (no merged/ or adapter/ in it)")
    return Predictor(model, task, None if task["inputs"] == "pixels" else make_tokenizer(tokens))


def read_inputs(path: Path) -> tuple[list[str], list[str]]:
    """The non-blank lines of ``path`` and where each is (``texts.txt:3``)."""
    if not path.is_file():
        raise PredictError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise PredictError(f"{path}: not UTF-8 text ({exc})") from None
    kept = [(f"{path}:{n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if not kept:
        raise PredictError(f"{path}: no inputs (the file is empty; one input per line)")
    return [t for _, t in kept], [w for w, _ in kept]


def _line(result: dict[str, Any]) -> str:
    if "generated" in result:
        return json.dumps(result["generated"], ensure_ascii=False)  # one line even when the text has newlines
    return f"{result.get('label', result.get('choice'))}\t{result['probability']:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trials.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="what trials.train wrote (--out), or its merged/ directory")
    p.add_argument("inputs", type=Path, help="a text file, one input per line")
    p.add_argument("--json", action="store_true", help="one JSON object per input, with every probability")
    p.add_argument("--max-new-tokens", type=int, help="causal_lm: tokens to generate (default: the task's, or 64)")
    a = p.parse_args(argv)
    try:
        texts, where = read_inputs(a.inputs)
        predictor = load_predictor(a.out)
        results = predictor.predict(texts, where, a.max_new_tokens)
    except (PredictError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w, r in zip(where, results, strict=True):
        print(json.dumps({"input": w, **r}, ensure_ascii=False) if a.json else _line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
