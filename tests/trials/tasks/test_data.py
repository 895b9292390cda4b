from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from space.config import ModelSpec, TaskSpec
from trials.heldout import STDLIB_TASK_MODULES
from trials.models.vocab import PIXEL_OFFSET, ByteTokenizer
from trials.pretraining import pretrain
from trials.tasks.base import DataError
from trials.tasks.registry import TASK_TYPES, load_task
from trials.tasks.sources.digits import digits_split_indices, load_digits_task
from trials.tasks.sources.files import load_files_task
from trials.tasks.sources.hf import load_hf_dataset_task
from trials.tasks.sources.pydoc import PYDOC_TOPICS, load_pydoc_task
from trials.tasks.sources.stdlib import STDLIB_MODULE_CLASSES, load_stdlib_modules_task, stdlib_module_examples


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


@pytest.mark.parametrize("corpus", pretrain.CORPORA)
def test_pretraining_text_excludes_the_downstream_text_task(corpus):
    from pydoc_data.topics import topics

    text = " ".join(bytes(i - 3 for i in pretrain.text_corpus(corpus)).decode("utf-8", "replace").split())
    for name in PYDOC_TOPICS:
        assert " ".join(topics[name].split())[200:296] not in text, name
    assert not any("pydoc_data" in f for f in pretrain.stdlib_files(corpus))


def test_the_stdlib_corpus_leaves_out_every_module_the_stdlib_tasks_are_made_from():
    import importlib
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = set(pretrain.stdlib_files("stdlib"))
    assert len(files) > 300 and set(pretrain.stdlib_files("tiny")) <= files  # the task filter covers both corpora
    assert {"typing.py", "json/decoder.py", "asyncio/events.py"} <= files
    for module in STDLIB_TASK_MODULES:
        source = Path(importlib.import_module(module).__file__ or "").resolve().relative_to(root.resolve())
        assert source.as_posix() not in files, module
        assert not any(f.split("/")[0].removesuffix(".py") == module.split(".")[0] for f in files), module
    assert not any(part in pretrain.EXCLUDED_DIRS for f in files for part in f.split("/"))


def test_stdlib_modules_task_has_fixed_disjoint_splits_of_text_never_pretrained_on():
    task = load_stdlib_modules_task(seed=0, shots_per_class=10)
    assert task.num_classes == len(STDLIB_MODULE_CLASSES) == 8
    for split in (task.train, task.val, task.test):
        assert set(split.labels.tolist()) == set(range(8))
    assert np.bincount(task.train.labels.numpy()).tolist() == [10] * 8
    assert len(task.val) >= 100 and len(task.test) >= 100

    def texts(split):
        rows = zip(split.ids, split.lengths, strict=True)
        return {bytes(int(t) - 3 for t in row[:n]).decode("utf-8") for row, n in rows}

    train, val, test = texts(task.train), texts(task.val), texts(task.test)
    assert not (train & val or train & test or val & test)
    assert all(": " in t and not t.startswith(m) for t in val for m in STDLIB_MODULE_CLASSES)
    again = load_stdlib_modules_task(seed=0, shots_per_class=10)
    assert torch.equal(again.val.ids, task.val.ids) and torch.equal(again.val.labels, task.val.labels)
    other = load_stdlib_modules_task(seed=1, shots_per_class=10)
    assert texts(other.val) != val
    examples = stdlib_module_examples()
    assert all(len(v) >= 30 for v in examples.values())
    corpus = bytes(i - 3 for i in pretrain.text_corpus("stdlib")).decode("utf-8", "replace")
    summaries = [t.split("): ", 1)[1] for v in examples.values() for t in v]
    assert len(summaries) > 300 and not [s for s in summaries if s in corpus]
    assert load_task(TaskSpec(name="stdlib_modules"), ModelSpec()).name == "stdlib_modules"


def test_pydoc_task_has_every_topic_in_every_split():
    task = load_pydoc_task(shots_per_class=8)
    assert task.num_classes == len(PYDOC_TOPICS)
    for split in (task.train, task.val, task.test):
        assert set(split.labels.tolist()) == set(range(len(PYDOC_TOPICS)))
    assert len(task.train) == 8 * len(PYDOC_TOPICS)


def test_csv_task_reads_columns_named_in_the_space_and_splits_by_seed(tmp_path):
    rows = "\n".join(f"{'good' if i % 2 else 'bad'} film number {i},{'pos' if i % 2 else 'neg'}" for i in range(40))
    (tmp_path / "train.csv").write_text("review,sentiment\n" + rows + "\n")
    task = load_files_task("csv", TASK_TYPES["classification"], {"train": str(tmp_path / "train.csv")},
                           {"text": "review", "label": "sentiment"}, ByteTokenizer(), max_length=32)
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
        load_files_task("csv", TASK_TYPES["classification"], {"train": str(tmp_path / "train.csv")},
                        {"text": "text", "label": "label"}, ByteTokenizer(), 16)


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.csv does not exist"):
        load_files_task("csv", TASK_TYPES["classification"], {"train": str(tmp_path / "nope.csv")},
                        {"text": "text", "label": "label"}, ByteTokenizer(), 16)


def test_hugging_face_dataset_loads_through_datasets_offline(tmp_path):
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        body = "\n".join(f"sentence {i},{i % 3}" for i in range(n))
        (tmp_path / f"{split}.csv").write_text("text,label\n" + body + "\n")
    task = load_hf_dataset_task(str(tmp_path), None, {"train": "train", "validation": "validation", "test": "test"},
                                TASK_TYPES["classification"], {"text": "text", "label": "label"}, ByteTokenizer(), 24)
    assert task.num_classes == 3 and (len(task.train), len(task.val), len(task.test)) == (8, 4, 4)
