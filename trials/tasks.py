"""Load the task a TrialConfig names, with the tokenizer that fits the model."""

from __future__ import annotations

from pathlib import Path

from space.config import COLUMN_ROLES, ModelSpec, TaskSpec
from trials.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    TaskData,
    Tokenizer,
    load_digits_task,
    load_hf_lm_task,
    load_hf_task,
    load_pydoc_task,
    load_stdlib_docstrings_task,
    load_stdlib_functions_task,
    load_stdlib_modules_task,
    load_table_lm_task,
    load_table_task,
)
from trials.model import resolve_checkpoint


def make_tokenizer(model: ModelSpec) -> Tokenizer:
    """``auto``: the checkpoint's own tokenizer when its directory has one, else the byte tokenizer."""
    if model.tokenizer == "bytes":
        return ByteTokenizer()
    source = resolve_checkpoint(model.checkpoint) if model.tokenizer == "auto" else model.tokenizer
    if model.tokenizer == "auto":
        local = Path(source)
        has_files = local.is_dir() and any((local / f).exists() for f in (
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))
        if not has_files:
            return ByteTokenizer()
    try:
        return HFTokenizer(source)
    except Exception as exc:
        raise DataError(f"model.tokenizer: cannot load a tokenizer from {source!r}: {exc}") from exc


def load_task(task: TaskSpec, model: ModelSpec) -> TaskData:
    if task.name == "digits":
        return load_digits_task(task.split_seed, task.shots_per_class)
    tok = make_tokenizer(model)
    if task.name == "pydoc_topics":
        return load_pydoc_task(task.split_seed, task.shots_per_class, tokenizer=tok)
    if task.name == "stdlib_modules":
        return load_stdlib_modules_task(task.split_seed, task.shots_per_class, tok, task.max_length)
    if task.name == "stdlib_docstrings":
        return load_stdlib_docstrings_task(task.split_seed, tok, task.max_length)
    if task.name == "stdlib_functions":
        return load_stdlib_functions_task(task.split_seed, tok, task.max_length)
    if task.task_type == "classification":
        return _load_user_classification(task, tok)
    columns = {role: task.column(role) for role in COLUMN_ROLES[task.task_type]}
    if task.name in ("csv", "jsonl"):
        return load_table_lm_task(task.name, task.task_type, {str(k): v for k, v in task.files.items()}, columns, tok,
                                  task.max_length, task.split_seed)
    assert task.hf_dataset is not None  # checked when the space was validated
    return load_hf_lm_task(task.hf_dataset, task.hf_config, {str(k): v for k, v in task.hf_splits.items()},
                           task.task_type, columns, tok, task.max_length, task.split_seed)


def _load_user_classification(task: TaskSpec, tok: Tokenizer) -> TaskData:
    text, label = task.column("text"), task.column("label")
    assert isinstance(text, str) and isinstance(label, str)  # only choices may be a list (checked on validation)
    if task.name in ("csv", "jsonl"):
        files = {str(k): v for k, v in task.files.items()}
        return load_table_task(task.name, files, text, label, tok, task.max_length, task.split_seed)
    assert task.hf_dataset is not None  # checked when the space was validated
    return load_hf_task(task.hf_dataset, task.hf_config, text, label, tok, task.max_length,
                        {str(k): v for k, v in task.hf_splits.items()})
