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

from space.config import ModelSpec
from trials.models.backbone import OnBackbone
from trials.models.vocab import PIXEL_LEVELS, PIXEL_OFFSET
from trials.tasks.base import PredictError
from trials.tasks.interface import Inputs
from trials.tasks.registry import task_type
from trials.tasks.tokenizers import Tokenizer, make_tokenizer
from trials.trained import HEAD_FILE, load_merged, load_trained, read_task

BATCH = 32

__all__ = ["PredictError", "Predictor", "load_predictor", "main", "read_inputs"]


@dataclass
class Predictor:
    """A saved model with what reading its inputs needs: the task description and the tokenizer."""

    model: OnBackbone
    task: dict[str, Any]
    tokenizer: Tokenizer | None  # None: pixel inputs (digits)

    @property
    def task_type(self) -> str:
        return str(self.task["task_type"])

    def predict(self, inputs: list[str], where: list[str] | None = None, max_new_tokens: int | None = None
                ) -> list[dict[str, Any]]:
        """One result per input, as the task type predicts (``trials.tasks.types``): ``label``, ``probability`` and
        ``probabilities`` (classification), ``generated`` (causal_lm), or ``choice``, ``index``, ``probability`` and
        ``probabilities`` (multiple_choice). ``where`` names each input in errors (``texts.txt:3``)."""
        where = where or [f"input {i}" for i in range(len(inputs))]
        if not inputs:
            raise PredictError("no inputs")
        kind = task_type(self.task_type)
        reader = Inputs(self._encode, self.tokenizer, self.task)
        out: list[dict[str, Any]] = []
        for i in range(0, len(inputs), BATCH):
            out += kind.predict(self.model, inputs[i : i + BATCH], where[i : i + BATCH], reader, max_new_tokens)
        return out

    def _encode(self, text: str, where: str) -> list[int]:
        if self.tokenizer is None:
            return _pixels(text, where, int(self.task["max_length"]))
        ids = self.tokenizer.encode(text)
        if not ids:
            raise PredictError(f"{where}: empty after tokenisation")
        if len(ids) > self.task["max_length"]:
            raise PredictError(f"{where}: {len(ids)} tokens, longer than the task's max_length "
                               f"{self.task['max_length']}")
        return ids


def _pixels(line: str, where: str, length: int) -> list[int]:
    """A line of ``length`` pixel intensities (digits: 64, an 8x8 image row by row)."""
    values = line.replace(",", " ").split()
    if len(values) != length or not all(v.isdigit() and int(v) < PIXEL_LEVELS for v in values):
        raise PredictError(f"{where}: expected {length} pixel intensities 0..{PIXEL_LEVELS - 1} (an 8x8 image "
                           f"row by row), got {len(values)} values: {line[:60]!r}")
    return [PIXEL_OFFSET + int(v) for v in values]


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
