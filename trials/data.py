"""Downstream tasks: fixed train / validation / test splits of token sequences with class labels.

Built-in tasks use real data that ships with the installed packages, so they work offline:
- ``digits``: scikit-learn's 8x8 handwritten digits read row by row as 64-step pixel sequences, with a
  few-shot training split (10 per class by default) in the spirit of VTAB-1k.
- ``pydoc_topics``: 96-byte windows of the Python language reference (``pydoc_data.topics``), labelled with
  the reference topic they were cut from (the largest topics only).
User data: ``csv`` / ``jsonl`` files (text and label columns named in space.yaml, one file per split or
one file split by seed), or a Hugging Face dataset name loaded through ``datasets``.

Token layout of the embedded model (``ByteTokenizer``): 0 = pad, 1 = cls, 2 = sep, 3..258 = bytes,
259..275 = pixel intensities 0..16. A user's checkpoint with its own tokenizer uses that tokenizer for text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
BYTE_OFFSET = 3
PIXEL_OFFSET = BYTE_OFFSET + 256
PIXEL_LEVELS = 17
EMBEDDED_VOCAB_SIZE = 288  # 276 used ids rounded up to a multiple of 16

# Largest topics of the language reference; a fixed list keeps the task's classes the same on every machine.
PYDOC_TOPICS = ("specialnames", "compound", "formatstrings", "string-methods", "debugger", "typesmapping")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; the embedded model's tokenizer."""

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < PIXEL_OFFSET).decode("utf-8", "replace")


class HFTokenizer:
    """A checkpoint's own tokenizer (no special tokens added: pooling reads the last real position)."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(name_or_path)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Split:
    """One split: ``ids`` [n, L] right-padded with PAD_ID, ``lengths`` [n], ``labels`` [n]."""

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TaskData:
    name: str
    num_classes: int
    train: Split
    val: Split
    test: Split

    def max_token_id(self) -> int:
        return int(max(s.ids.max().item() for s in (self.train, self.val, self.test)))


class DataError(ValueError):
    """Bad or missing task data; the message names the file, column or value."""


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


# --- digits -------------------------------------------------------------------------------------------


def digits_split_indices(seed: int = 0, shots_per_class: int = 10, n_val: int = 300, n_test: int = 500
                         ) -> dict[str, np.ndarray]:
    """Fixed index sets into ``load_digits()``: few-shot train, val, test, and the unlabelled rest.

    The ``rest`` images (and the train images) may be used for self-supervised pretraining; val and test
    never are.
    """
    from sklearn.datasets import load_digits

    y = load_digits().target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, val, pool = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    train = np.concatenate([pool[y[pool] == c][:shots_per_class] for c in range(10)])
    rest = np.setdiff1d(pool, train)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test), "rest": np.sort(rest)}


def digit_tokens(image: np.ndarray) -> list[int]:
    """An 8x8 image with values 0..16 as 64 pixel tokens, row by row."""
    return [PIXEL_OFFSET + int(v) for v in image.reshape(-1)]


def load_digits_task(seed: int = 0, shots_per_class: int = 10) -> TaskData:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = digits_split_indices(seed, shots_per_class)

    def split(name: str) -> Split:
        rows = idx[name]
        return make_split([digit_tokens(d.images[i]) for i in rows], d.target[rows].tolist(), 64)

    return TaskData("digits", 10, split("train"), split("val"), split("test"))


# --- pydoc topics -------------------------------------------------------------------------------------


def pydoc_windows(window: int = 96) -> dict[str, list[str]]:
    """Non-overlapping windows of each chosen topic's text (whitespace collapsed)."""
    from pydoc_data.topics import topics

    out: dict[str, list[str]] = {}
    for name in PYDOC_TOPICS:
        text = " ".join(topics[name].split())
        out[name] = [text[i : i + window] for i in range(0, len(text) - window + 1, window)]
    return out


def load_pydoc_task(seed: int = 0, shots_per_class: int = 32, window: int = 96,
                    tokenizer: Tokenizer | None = None) -> TaskData:
    tok = tokenizer or ByteTokenizer()
    rng = random.Random(seed)
    parts: dict[str, tuple[list[list[int]], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, (_, windows) in enumerate(pydoc_windows(window).items()):
        order = list(range(len(windows)))
        rng.shuffle(order)
        # Per class: 20% test, 20% val, then a few-shot training set from the remainder.
        n = len(order)
        cut = {"test": order[: n // 5], "val": order[n // 5 : 2 * n // 5],
               "train": order[2 * n // 5 :][:shots_per_class]}
        for split_name, rows in cut.items():
            seqs, labels = parts[split_name]
            seqs.extend(tok.encode(windows[i]) for i in rows)
            labels.extend([label] * len(rows))
    max_len = max(len(s) for seqs, _ in parts.values() for s in seqs)
    splits = {k: make_split(seqs, labels, max_len) for k, (seqs, labels) in parts.items()}
    return TaskData("pydoc_topics", len(PYDOC_TOPICS), splits["train"], splits["val"], splits["test"])


# --- user data ----------------------------------------------------------------------------------------


def _rows_to_split(rows: Sequence[dict[str, Any]], where: str, text_column: str, label_column: str,
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


def _read_table(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    from datasets import load_dataset

    kind = "json" if path.suffix in (".jsonl", ".json") else "csv"
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types; the path is what the user needs
        raise DataError(f"could not read {path} as {kind}: {exc}") from exc
    return list(ds)


def load_table_task(name: str, files: dict[str, str], text_column: str, label_column: str,
                    tok: Tokenizer, max_length: int, seed: int = 0) -> TaskData:
    """CSV/JSONL task. ``files`` has ``train`` and optionally ``validation``/``test``; missing splits are
    cut from train by seed (10% each), so the split is fixed for a given file and seed."""
    if "train" not in files:
        raise DataError("task.files: a 'train' file is required")
    tables = {k: _read_table(Path(v)) for k, v in files.items()}
    train_rows = tables["train"]
    rng = random.Random(seed)
    if "validation" not in tables or "test" not in tables:
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        n_hold = max(1, len(order) // 10)
        held = {"test": [train_rows[i] for i in order[:n_hold]],
                "validation": [train_rows[i] for i in order[n_hold : 2 * n_hold]]}
        rest = [train_rows[i] for i in order[2 * n_hold :]]
        for k in ("validation", "test"):
            tables.setdefault(k, held[k])
        tables["train"] = rest
    for k, rows in tables.items():
        if not rows:
            raise DataError(f"task.files.{k}: no rows")
    label_names = sorted({str(r.get(label_column)) for r in tables["train"]})
    index = {n: i for i, n in enumerate(label_names)}
    splits = {k: _rows_to_split(tables[k], f"task.files.{k}", text_column, label_column, index, tok, max_length)
              for k in ("train", "validation", "test")}
    return TaskData(name, len(label_names), splits["train"], splits["validation"], splits["test"])


def load_hf_task(dataset: str, config: str | None, text_column: str, label_column: str, tok: Tokenizer,
                 max_length: int, splits: dict[str, str]) -> TaskData:
    """A dataset from the Hugging Face hub or a local dataset script/directory, through ``datasets``."""
    from datasets import load_dataset

    out = {}
    for ours, theirs in splits.items():
        try:
            ds = load_dataset(dataset, config, split=theirs)
        except Exception as exc:
            raise DataError(f"task.hf_dataset: could not load {dataset!r} split {theirs!r}: {exc}") from exc
        out[ours] = list(ds)
    label_names = sorted({str(r.get(label_column)) for r in out["train"]})
    index = {n: i for i, n in enumerate(label_names)}
    built = {k: _rows_to_split(v, f"task.splits.{k}", text_column, label_column, index, tok, max_length)
             for k, v in out.items()}
    return TaskData(dataset, len(label_names), built["train"], built["validation"], built["test"])
