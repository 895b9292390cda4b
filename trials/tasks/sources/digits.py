"""``digits`` (classification): scikit-learn's 8x8 handwritten digits read row by row as 64-step pixel sequences, with
a few-shot training split (10 per class by default) in the spirit of VTAB-1k. Real data that ships with scikit-learn,
so it works offline; inputs are pixels (``trials.models.vocab``), never text, so no tokenizer is used."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from space.config import TaskSpec
from trials.models.vocab import PIXEL_OFFSET
from trials.tasks.base import Split, TaskData, make_split
from trials.tasks.interface import TaskKind
from trials.tasks.tokenizers import Tokenizer

DIGITS_LENGTH = 64  # an 8x8 image, row by row


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


class Digits:
    inputs = "pixels"

    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        return load_digits_task(task.split_seed, task.shots_per_class)

    def class_names(self, task: TaskSpec) -> list[str]:
        return [str(d) for d in range(10)]

    def input_length(self, task: TaskSpec) -> int:
        return DIGITS_LENGTH


SOURCE = Digits()
