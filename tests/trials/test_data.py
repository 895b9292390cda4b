from __future__ import annotations

import json

import numpy as np
import pytest

from space.config import ModelSpec, TaskSpec
from trials import pretrain
from trials.data import (
    PIXEL_OFFSET,
    PYDOC_TOPICS,
    ByteTokenizer,
    DataError,
    digits_split_indices,
    load_digits_task,
    load_hf_task,
    load_pydoc_task,
    load_table_task,
)
from trials.tasks import load_task


def test_digits_splits_are_fixed_disjoint_and_few_shot():
    a, b = digits_split_indices(0), digits_split_indices(0)
    for k in a:
        assert np.array_equal(a[k], b[k])
    sets = {k: set(v.tolist()) for k, v in a.items()}
    for x, y in [("train", "val"), ("train", "test"), ("val", "test"), ("rest", "val"), ("rest", "test")]:
        assert not sets[x] & sets[y], (x, y)
    task = load_digits_task(shots_per_class=10)
    assert len(task.train) == 100 and np.bincount(task.train.labels.numpy()).tolist() == [10] * 10
    assert (len(task.val), len(task.test)) == (300, 500)
    assert task.train.ids.shape[1] == 64 and int(task.train.ids.min()) >= PIXEL_OFFSET


def test_pretraining_never_sees_validation_or_test_digits():
    from sklearn.datasets import load_digits

    images = load_digits().images
    idx = digits_split_indices(0)
    held_out = {tuple(pretrain.digit_tokens(images[i])) for i in np.concatenate([idx["val"], idx["test"]])}
    allowed = {tuple(pretrain.digit_tokens(images[i])) for i in np.concatenate([idx["train"], idx["rest"]])}
    corpus = {tuple(seq) for seq in pretrain.image_corpus(0)}
    # Identical pixel grids can occur in both groups; only grids unique to val/test must be absent.
    assert not (corpus & (held_out - allowed))
    assert len(pretrain.image_corpus(0)) == len(idx["train"]) + len(idx["rest"])


def test_pretraining_text_excludes_the_downstream_text_task():
    from pydoc_data.topics import topics

    corpus = bytes(i - 3 for i in pretrain.text_corpus()).decode("utf-8")
    sample = " ".join(topics["formatstrings"].split())[200:296]
    assert sample not in " ".join(corpus.split())
    assert not any("pydoc" in f for f in pretrain.STDLIB_FILES)


def test_pydoc_task_has_every_topic_in_every_split():
    task = load_pydoc_task(shots_per_class=8)
    assert task.num_classes == len(PYDOC_TOPICS)
    for split in (task.train, task.val, task.test):
        assert set(split.labels.tolist()) == set(range(len(PYDOC_TOPICS)))
    assert len(task.train) == 8 * len(PYDOC_TOPICS)


def test_csv_task_reads_columns_named_in_the_space_and_splits_by_seed(tmp_path):
    rows = "\n".join(f"{'good' if i % 2 else 'bad'} film number {i},{'pos' if i % 2 else 'neg'}" for i in range(40))
    (tmp_path / "train.csv").write_text("review,sentiment\n" + rows + "\n")
    task = load_table_task("csv", {"train": str(tmp_path / "train.csv")}, "review", "sentiment", ByteTokenizer(),
                           max_length=32)
    assert task.num_classes == 2
    assert (len(task.train), len(task.val), len(task.test)) == (32, 4, 4)
    assert task.train.ids.shape[1] == 32


def test_jsonl_task_with_explicit_splits(tmp_path):
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        lines = [json.dumps({"text": f"example {i}", "label": i % 2}) for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    spec = TaskSpec(name="jsonl", files={k: str(tmp_path / f"{k}.jsonl") for k in ("train", "validation", "test")})
    task = load_task(spec, ModelSpec())
    assert (len(task.train), len(task.val), len(task.test)) == (6, 2, 2)


def test_missing_column_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("body,label\nhello,1\nworld,0\n" * 5)
    with pytest.raises(DataError, match="has no column 'text'"):
        load_table_task("csv", {"train": str(tmp_path / "train.csv")}, "text", "label", ByteTokenizer(), 16)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.csv does not exist"):
        load_table_task("csv", {"train": str(tmp_path / "nope.csv")}, "text", "label", ByteTokenizer(), 16)


def test_hugging_face_dataset_loads_through_datasets_offline(tmp_path):
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        body = "\n".join(f"sentence {i},{i % 3}" for i in range(n))
        (tmp_path / f"{split}.csv").write_text("text,label\n" + body + "\n")
    task = load_hf_task(str(tmp_path), None, "text", "label", ByteTokenizer(), 24,
                        {"train": "train", "validation": "validation", "test": "test"})
    assert task.num_classes == 3 and (len(task.train), len(task.val), len(task.test)) == (8, 4, 4)
