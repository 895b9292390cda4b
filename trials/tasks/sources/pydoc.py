"""``pydoc_topics`` (classification): 96-byte windows of the Python language reference (``pydoc_data.topics``),
labelled with the reference topic they were cut from (the largest topics only)."""

from __future__ import annotations

import random
from collections.abc import Callable

from space.config import TaskSpec
from trials.models.vocab import ByteTokenizer
from trials.tasks.base import TaskData, make_split
from trials.tasks.interface import TaskKind
from trials.tasks.tokenizers import Tokenizer

# Largest topics of the language reference; a fixed list keeps the task's classes the same on every machine.
PYDOC_TOPICS = ("specialnames", "compound", "formatstrings", "string-methods", "debugger", "typesmapping")


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


class PydocTopics:
    inputs = "text"

    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        return load_pydoc_task(task.split_seed, task.shots_per_class, tokenizer=tokenizer())

    def class_names(self, task: TaskSpec) -> list[str]:
        return list(PYDOC_TOPICS)

    def input_length(self, task: TaskSpec) -> int:
        return task.max_length


SOURCE = PydocTopics()
