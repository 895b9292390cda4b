"""Downstream tasks: fixed train / validation / test splits of token sequences, by task type.

Task types (``Split`` documents each one's rows): ``classification`` (a class label per sequence), ``causal_lm``
(prompt and response; the loss is on the response) and ``multiple_choice`` (a question and its choices, each choice
scored by the language model).

Built-in tasks use real data that ships with the installed packages, so they work offline:
- ``digits`` (classification): scikit-learn's 8x8 handwritten digits read row by row as 64-step pixel sequences,
  with a few-shot training split (10 per class by default) in the spirit of VTAB-1k.
- ``pydoc_topics`` (classification): 96-byte windows of the Python language reference (``pydoc_data.topics``),
  labelled with the reference topic they were cut from (the largest topics only).
- ``stdlib_docstrings`` (causal_lm): given a standard-library function's name and signature
  (``difflib.get_close_matches(word, possibilities, n=3, cutoff=0.6)``), write the first line of its docstring.
- ``stdlib_functions`` (multiple_choice): given that first line, pick the function among four names.
  Both stdlib tasks read the public functions and methods of the modules in ``STDLIB_TASK_MODULES``, none of which
  the embedded model was pretrained on, and leave out any function whose summary line occurs in the pretraining
  text. They come from the running interpreter, so their rows (and split sizes) depend on the Python minor version.
User data: ``csv`` / ``jsonl`` files (one file per split, or one file split by seed), or a Hugging Face dataset
loaded through ``datasets``, with columns named in space.yaml by role: text/label (classification),
prompt/response or Alpaca's instruction/input/output (causal_lm), question/choices/answer (multiple_choice).

Token layout of the embedded model (``ByteTokenizer``): 0 = pad, 1 = cls, 2 = sep (also eos), 3..258 = bytes,
259..275 = pixel intensities 0..16. A user's checkpoint with its own tokenizer uses that tokenizer for text.
"""

from __future__ import annotations

import csv
import functools
import importlib
import inspect
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol, TypeVar, get_args

import numpy as np
import torch

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
BYTE_OFFSET = 3
PIXEL_OFFSET = BYTE_OFFSET + 256
PIXEL_LEVELS = 17
EMBEDDED_VOCAB_SIZE = 288  # 276 used ids rounded up to a multiple of 16

T = TypeVar("T")

# Largest topics of the language reference; a fixed list keeps the task's classes the same on every machine.
PYDOC_TOPICS = ("specialnames", "compound", "formatstrings", "string-methods", "debugger", "typesmapping")


class Tokenizer(Protocol):
    # Appended to every causal_lm response so that generation learns to stop; None: the tokenizer has no such token.
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def format_prompt(self, text: str) -> str:
        """A causal_lm prompt as the model expects it (a chat model's template, or the text as it is)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; the embedded model's tokenizer."""

    eos_id: int | None = SEP_ID  # the embedded checkpoint's eos_token_id

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < PIXEL_OFFSET).decode("utf-8", "replace")

    def format_prompt(self, text: str) -> str:
        return text


class HFTokenizer:
    """A checkpoint's own tokenizer (no special tokens added: pooling reads the last real position)."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        self.eos_id: int | None = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def format_prompt(self, text: str) -> str:
        """The user turn of the tokenizer's chat template followed by the assistant's opening, when it has one."""
        if not getattr(self._tok, "chat_template", None):
            return text
        messages = [{"role": "user", "content": text}]
        return str(self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


TaskType = Literal["classification", "causal_lm", "multiple_choice"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)


@dataclass(frozen=True)
class Split:
    """One split as rows of tokens: ``ids`` [n, L] right-padded with PAD_ID, ``lengths`` [n], ``labels`` [n].

    - classification: a row is one example, ``labels`` its class.
    - causal_lm: a row is prompt + response; ``starts`` [n] is where the response begins, and the loss is on the
      response tokens ``ids[i, starts[i]:lengths[i]]`` only. ``labels`` is all zeros.
    - multiple_choice: a row is question + one choice; ``starts`` is where the choice begins, ``groups`` [n] the
      question the row belongs to (0..q-1, a question's rows next to each other, in choice order), and ``labels``
      is 1 on the correct choice's row and 0 elsewhere.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    starts: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_examples(self) -> int:
        """Examples (questions for multiple_choice, rows otherwise)."""
        return int(self.groups.max().item()) + 1 if self.groups is not None and len(self) else len(self)


@dataclass(frozen=True)
class TaskData:
    name: str
    num_classes: int  # classification: the classes; 0 for causal_lm and multiple_choice (no task head)
    train: Split
    val: Split
    test: Split
    type: TaskType = "classification"
    decode: Callable[[Sequence[int]], str] | None = None  # token ids -> text (causal_lm's exact match)
    notes: tuple[str, ...] = ()  # what loading changed (rows truncated), printed with the trial

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


# --- causal_lm and multiple_choice rows ----------------------------------------------------------------------

LMExample = tuple[str, str]  # causal_lm: (prompt, response)
ChoiceExample = tuple[str, list[str], int]  # multiple_choice: (question, choices, index of the answer)


def _continuation(choice: str) -> str:
    """A choice is scored as the continuation `` choice`` of its question (lm-evaluation-harness' convention)."""
    return choice if choice[:1].isspace() else " " + choice


def encode_lm_split(examples: Sequence[LMExample], tok: Tokenizer, max_length: int, where: str
                    ) -> tuple[Split, int]:
    """Prompts through ``tok.format_prompt``; every response ends with ``tok.eos_id`` (when it has one) so that
    generation learns to stop."""
    eos = [] if tok.eos_id is None else [tok.eos_id]
    pairs = [(tok.encode(tok.format_prompt(p)), tok.encode(r) + eos) for p, r in examples]
    return make_lm_split(pairs, max_length, where)


def encode_choice_split(examples: Sequence[ChoiceExample], tok: Tokenizer, max_length: int, where: str
                        ) -> tuple[Split, int]:
    """Questions as they are (no chat template: a choice is scored as the text that follows); no eos after a
    choice."""
    rows = [(tok.encode(q), [tok.encode(_continuation(c)) for c in choices], a) for q, choices, a in examples]
    return make_choice_split(rows, max_length, where)


def lm_task(name: str, task_type: TaskType, splits: Mapping[str, tuple[str, Sequence[Any]]], tok: Tokenizer,
            max_length: int) -> TaskData:
    """A causal_lm or multiple_choice task from ``{split: (where, examples)}``, with a note for every split in
    which rows were truncated."""
    encode: Callable[[Sequence[Any], Tokenizer, int, str], tuple[Split, int]] = (
        encode_lm_split if task_type == "causal_lm" else encode_choice_split)
    built: dict[str, Split] = {}
    notes = []
    for k, (where, examples) in splits.items():
        built[k], truncated = encode(examples, tok, max_length, where)
        if truncated:
            notes.append(f"{where}: {truncated} of {len(built[k])} rows longer than max_length {max_length} "
                         "were truncated")
    return TaskData(name, 0, built["train"], built["validation"], built["test"], type=task_type, decode=tok.decode,
                    notes=tuple(notes))


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


# --- standard-library functions (causal_lm, multiple_choice) ----------------------------------------------

# Pure-Python standard-library modules whose public functions and methods make the three stdlib tasks. None is in
# the pretraining corpora of the embedded models (trials.pretrain.stdlib_files leaves them out) or pydoc_data;
# modules whose signatures differ by machine (os, posixpath, platform, selectors) are left out so every machine
# with the same Python minor version builds the same tasks.
STDLIB_TASK_MODULES = (
    "base64", "bdb", "calendar", "cmd", "code", "codecs", "configparser", "contextlib", "csv", "difflib", "dis",
    "email.message", "email.utils", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "getopt", "glob",
    "graphlib", "gzip", "heapq", "hmac", "html", "http.client", "http.cookies", "imaplib", "ipaddress", "locale",
    "mailbox", "mimetypes", "optparse", "pickle", "poplib", "pprint", "queue", "quopri", "sched", "secrets", "shlex",
    "smtplib", "symtable", "tarfile", "tempfile", "threading", "tokenize", "traceback", "urllib.parse",
    "urllib.request", "uuid", "weakref", "zipfile",
)
# Split sizes of the stdlib tasks: 20% test and 20% validation, the rest train, each capped so a CPU trial stays
# small.
STDLIB_SPLIT_CAPS = {"test": 400, "validation": 300, "train": 1500}
STDLIB_CHOICES = 4
# stdlib_modules (classification): the eight modules of STDLIB_TASK_MODULES with the most functions on Python 3.11.
# Three are network protocol clients and two handle mail, so a name or a keyword alone does not decide.
STDLIB_MODULE_CLASSES = ("mailbox", "imaplib", "tarfile", "bdb", "ftplib", "urllib.request", "email.message",
                         "calendar")


@dataclass(frozen=True)
class StdlibFunction:
    name: str  # module.function or module.Class.method
    module: str
    signature: str  # without self/cls; a default that is not a plain literal shows as ...
    summary: str  # the first line of its own docstring


class _Elided:
    """Stands for a default whose repr varies between runs or machines (``<object object at 0x...>``)."""

    def __repr__(self) -> str:
        return "..."


def _plain(value: object) -> bool:
    if isinstance(value, tuple | frozenset):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str | bytes)


def _signature(func: Callable[..., Any], method: bool) -> str | None:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if method and params and params[0].name in ("self", "cls"):
        params = params[1:]
    params = [p if p.default is p.empty or _plain(p.default) else p.replace(default=_Elided()) for p in params]
    return str(sig.replace(parameters=params))


def _public_functions(module: ModuleType) -> Iterator[tuple[str, Callable[..., Any], bool]]:
    """(qualified name, function, is a method) for the public functions and methods of public classes the module
    itself defines, in name order."""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj, False
        elif inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                func = member.__func__ if isinstance(member, staticmethod | classmethod) else member
                if not attr.startswith("_") and inspect.isfunction(func):
                    yield f"{name}.{attr}", func, True


def _pretraining_text() -> str:
    from trials.pretrain import text_corpus  # pretrain imports this module

    return ByteTokenizer().decode(text_corpus())


@functools.cache
def stdlib_functions() -> tuple[StdlibFunction, ...]:
    """Every public function and method of STDLIB_TASK_MODULES with a docstring and a signature, sorted by name.

    A function whose summary line occurs anywhere in the pretraining text is left out, so no answer of either
    stdlib task was seen in pretraining. The set depends on the Python minor version.
    """
    corpus = _pretraining_text()
    out = []
    for module_name in STDLIB_TASK_MODULES:
        module = importlib.import_module(module_name)
        for qualname, func, method in _public_functions(module):
            doc = (func.__doc__ or "").strip()  # its own docstring: an inherited one may be pretraining text
            signature = _signature(func, method)
            if not doc or signature is None:
                continue
            summary = doc.splitlines()[0].strip()
            if summary not in corpus:
                out.append(StdlibFunction(f"{module_name}.{qualname}", module_name, signature, summary))
    return tuple(sorted(out, key=lambda f: f.name))


def stdlib_split(items: Sequence[T], seed: int) -> dict[str, list[T]]:
    """Test, validation and train items by seed (STDLIB_SPLIT_CAPS); each split keeps its shuffled order, so the
    first validation rows (causal_lm's exact match) are a random sample."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = min(len(items) // 5, STDLIB_SPLIT_CAPS["test"])
    n_val = min(len(items) // 5, STDLIB_SPLIT_CAPS["validation"])
    cuts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :][: STDLIB_SPLIT_CAPS["train"]]}
    return {k: [items[i] for i in idx] for k, idx in cuts.items()}


def load_stdlib_docstrings_task(seed: int = 0, tokenizer: Tokenizer | None = None, max_length: int = 128
                                ) -> TaskData:
    """causal_lm: prompt ``module.Class.method(signature)`` and a newline, response its docstring's summary line."""
    tok = tokenizer or ByteTokenizer()
    pairs: dict[str, str] = {}
    for f in stdlib_functions():
        pairs.setdefault(f"{f.name}{f.signature}\n", f.summary)
    splits = stdlib_split(sorted(pairs.items()), seed)
    return lm_task("stdlib_docstrings", "causal_lm", {k: (f"stdlib_docstrings.{k}", v) for k, v in splits.items()},
                   tok, max_length)


def stdlib_question(f: StdlibFunction, same_module: Sequence[str], everyone: Sequence[str], seed: int
                    ) -> ChoiceExample:
    """The question for ``f``: its summary, and its name among STDLIB_CHOICES - 1 others drawn by seed from its
    module (from all modules when its own has too few), in a seeded order."""
    rng = random.Random(f"{seed}:{f.name}")  # a str seed is hashed the same way in every process
    need = STDLIB_CHOICES - 1
    pool = [n for n in same_module if n != f.name]
    distractors = rng.sample(pool, need) if len(pool) >= need else pool + rng.sample(
        [n for n in everyone if n != f.name and n not in pool], need - len(pool))
    choices = [f.name, *distractors]
    rng.shuffle(choices)
    return f"Which function: {f.summary}\nAnswer:", choices, choices.index(f.name)


def load_stdlib_functions_task(seed: int = 0, tokenizer: Tokenizer | None = None, max_length: int = 128
                               ) -> TaskData:
    """multiple_choice: which of four functions a docstring summary describes. A summary shared by several
    functions has no single answer and is left out."""
    funcs = stdlib_functions()
    counts = Counter(f.summary for f in funcs)
    by_module: dict[str, list[str]] = defaultdict(list)
    for f in funcs:
        by_module[f.module].append(f.name)
    everyone = [f.name for f in funcs]
    questions = [stdlib_question(f, by_module[f.module], everyone, seed) for f in funcs if counts[f.summary] == 1]
    splits = stdlib_split(questions, seed)
    return lm_task("stdlib_functions", "multiple_choice", {k: (f"stdlib_functions.{k}", v) for k, v in splits.items()},
                   tokenizer or ByteTokenizer(), max_length)


def stdlib_module_examples() -> dict[str, list[str]]:
    """For each module of STDLIB_MODULE_CLASSES, its functions as ``name(signature): summary``.

    The name is the function's or method's own, without module or class (a class name such as ``IMAP4`` would give
    the answer away). A text that occurs in two modules has no single answer and is left out.
    """
    texts: dict[str, set[str]] = defaultdict(set)
    for f in stdlib_functions():
        if f.module in STDLIB_MODULE_CLASSES:
            texts[f"{f.name.rsplit('.', 1)[-1]}{f.signature}: {f.summary}"].add(f.module)
    out: dict[str, list[str]] = {m: [] for m in STDLIB_MODULE_CLASSES}
    for text, modules in sorted(texts.items()):
        if len(modules) == 1:
            out[next(iter(modules))].append(text)
    return out


def load_stdlib_modules_task(seed: int = 0, shots_per_class: int = 10, tokenizer: Tokenizer | None = None,
                             max_length: int = 128) -> TaskData:
    """classification: which of STDLIB_MODULE_CLASSES a function comes from, by its name, signature and summary.

    Per class, by seed: 30% test, 30% validation (the classes are small: 36 to 58 functions), and
    ``shots_per_class`` training examples from the remaining 40%. A text longer than ``max_length`` tokens keeps its
    start.
    """
    tok = tokenizer or ByteTokenizer()
    rng = random.Random(seed)
    parts: dict[str, tuple[list[list[int]], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, texts in enumerate(stdlib_module_examples().values()):
        order = list(range(len(texts)))
        rng.shuffle(order)
        n = len(order)
        cut = {"test": order[: 3 * n // 10], "val": order[3 * n // 10 : 6 * n // 10],
               "train": order[6 * n // 10 :][:shots_per_class]}
        for split_name, rows in cut.items():
            seqs, labels = parts[split_name]
            seqs.extend(tok.encode(texts[i])[:max_length] for i in rows)
            labels.extend([label] * len(rows))
    longest = max(len(s) for seqs, _ in parts.values() for s in seqs)
    splits = {k: make_split(seqs, labels, longest) for k, (seqs, labels) in parts.items()}
    return TaskData("stdlib_modules", len(STDLIB_MODULE_CLASSES), splits["train"], splits["val"], splits["test"])


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


def _read_table(path: Path, as_text: bool = False) -> list[dict[str, Any]]:
    """The rows of a CSV or JSON(L) file; ``as_text`` reads every CSV column as text (None where a cell is empty)
    instead of letting pandas guess numbers."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    from datasets import Features, Value, load_dataset

    kind = "json" if path.suffix in (".jsonl", ".json") else "csv"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            lines = csv.reader(f) if kind == "csv" else (line for line in f if line.strip())
            head = list(itertools.islice(lines, 2))
        if len(head) < (2 if kind == "csv" else 1):
            return []  # datasets refuses a file without rows; the caller's "no rows" error names the split instead
        features = Features({c: Value("string") for c in head[0]}) if as_text and kind == "csv" else None
        return list(load_dataset(kind, data_files=str(path), split="train", features=features))
    except Exception as exc:  # datasets raises many types; the path is what the user needs
        raise DataError(f"could not read {path} as {kind}: {exc}") from exc


def _cut_missing_splits(tables: Mapping[str, list[T]], seed: int) -> dict[str, list[T]]:
    """When validation or test is missing, 10% of train each (at least one row) by seed is held out for them; a
    split that was given is kept, and train loses the held-out rows either way."""
    out = dict(tables)
    if "validation" in out and "test" in out:
        return out
    train_rows = out["train"]
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    n_hold = max(1, len(order) // 10)
    held = {"test": [train_rows[i] for i in order[:n_hold]],
            "validation": [train_rows[i] for i in order[n_hold : 2 * n_hold]]}
    for k in ("validation", "test"):
        out.setdefault(k, held[k])
    out["train"] = [train_rows[i] for i in order[2 * n_hold :]]
    return out


def _load_hf_split(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        return list(load_dataset(dataset, config, split=split))
    except Exception as exc:
        raise DataError(f"task.hf_dataset: could not load {dataset!r} split {split!r}: {exc}") from exc


def load_table_task(name: str, files: dict[str, str], text_column: str, label_column: str,
                    tok: Tokenizer, max_length: int, seed: int = 0) -> TaskData:
    """CSV/JSONL task. ``files`` has ``train`` and optionally ``validation``/``test``; missing splits are
    cut from train by seed (10% each), so the split is fixed for a given file and seed."""
    if "train" not in files:
        raise DataError("task.files: a 'train' file is required")
    tables = _cut_missing_splits({k: _read_table(Path(v)) for k, v in files.items()}, seed)
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
    out = {ours: _load_hf_split(dataset, config, theirs) for ours, theirs in splits.items()}
    label_names = sorted({str(r.get(label_column)) for r in out["train"]})
    index = {n: i for i, n in enumerate(label_names)}
    built = {k: _rows_to_split(v, f"task.splits.{k}", text_column, label_column, index, tok, max_length)
             for k, v in out.items()}
    return TaskData(dataset, len(label_names), built["train"], built["validation"], built["test"])


# --- user data: causal_lm and multiple_choice ----------------------------------------------------------------
# Both task types are read out by the language-model head. Row numbers in errors count from 0 in the file or
# dataset split the row came from, as ``datasets`` numbers them; a CSV file's row 0 is the line after the header.


@dataclass(frozen=True)
class _Row:
    where: str  # the file or dataset split the row came from
    index: int
    values: dict[str, Any]

    def error(self, column: str, problem: str) -> DataError:
        return DataError(f"{self.where}: row {self.index}: column {column!r}: {problem}")

    def get(self, column: str) -> Any:
        if column not in self.values:
            raise self.error(column, f"missing (columns: {sorted(self.values)})")
        return self.values[column]

    def text(self, column: str) -> str:
        return self.check_text(column, self.get(column))

    def check_text(self, column: str, value: Any, what: str = "") -> str:
        """``value`` (read from ``column``) when it is text that is not blank."""
        if not isinstance(value, str) or not value.strip():
            raise self.error(column, f"{what}expected non-empty text, got {value!r}")
        return value


@dataclass(frozen=True)
class _Table:
    where: str  # the split's name and source, for errors that are not about one row, and for notes
    rows: list[_Row]


def _one_column(columns: Mapping[str, str | Sequence[str]], role: str) -> str:
    column = columns.get(role, role)
    if not isinstance(column, str):
        raise DataError(f"task.columns.{role}: one column name, not {column!r}")
    return column


def _lm_roles(row: _Row, columns: Mapping[str, str | Sequence[str]]) -> tuple[str, str]:
    """Which causal_lm layout the data has, by the columns of its first training row: (prompt, response) or
    Alpaca's (instruction, output), with ``input`` optional."""
    missing = {}
    for roles in (("prompt", "response"), ("instruction", "output")):
        missing[roles] = [c for c in (_one_column(columns, r) for r in roles) if c not in row.values]
        if not missing[roles]:
            return roles
    (pr, p_missing), (io, i_missing) = missing.items()
    raise DataError(f"{row.where}: row {row.index}: neither {'/'.join(pr)} columns (missing {p_missing}) nor "
                    f"{'/'.join(io)} columns (missing {i_missing}); its columns: {sorted(row.values)}")


def _lm_example(row: _Row, columns: Mapping[str, str | Sequence[str]], roles: tuple[str, str]) -> LMExample:
    prompt = row.text(_one_column(columns, roles[0]))
    response = row.text(_one_column(columns, roles[1]))
    if roles[0] == "instruction":
        extra_column = _one_column(columns, "input")
        extra = row.values.get(extra_column)
        if extra is not None and not isinstance(extra, str):
            raise row.error(extra_column, f"expected text, got {extra!r}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    return prompt, response


def _choices(row: _Row, spec: str | Sequence[str]) -> list[str]:
    """One list-valued column (JSONL, datasets), or one column per choice (CSV)."""
    if not isinstance(spec, str):
        return [row.text(column) for column in spec]
    value = row.get(spec)
    if not isinstance(value, list) or len(value) < 2:
        raise row.error(spec, f"expected a list of at least 2 choices, got {value!r}")
    return [row.check_text(spec, v, f"choice {c}: ") for c, v in enumerate(value)]


def _answer(row: _Row, column: str, choices: Sequence[str]) -> int:
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


def _choice_example(row: _Row, columns: Mapping[str, str | Sequence[str]]) -> ChoiceExample:
    choices = _choices(row, columns.get("choices", "choices"))
    return row.text(_one_column(columns, "question")), choices, _answer(row, _one_column(columns, "answer"), choices)


def _lm_tables_task(name: str, task_type: TaskType, tables: dict[str, _Table], cut_where: Callable[[str], str],
                    columns: Mapping[str, str | Sequence[str]], tok: Tokenizer, max_length: int, seed: int
                    ) -> TaskData:
    """Missing validation/test splits are cut from train by seed; ``cut_where(split)`` names such a split."""
    for table in tables.values():
        if not table.rows:
            raise DataError(f"{table.where}: no rows")
    cut = _cut_missing_splits({k: t.rows for k, t in tables.items()}, seed)
    where = {k: tables[k].where if k in tables else cut_where(k) for k in cut}
    if task_type == "causal_lm":
        roles = _lm_roles(tables["train"].rows[0], columns)
        examples: dict[str, list[Any]] = {k: [_lm_example(r, columns, roles) for r in rows] for k, rows in cut.items()}
    else:
        examples = {k: [_choice_example(r, columns) for r in rows] for k, rows in cut.items()}
    return lm_task(name, task_type, {k: (where[k], v) for k, v in examples.items()}, tok, max_length)


def load_table_lm_task(name: str, task_type: TaskType, files: Mapping[str, str],
                       columns: Mapping[str, str | Sequence[str]], tok: Tokenizer, max_length: int, seed: int = 0
                       ) -> TaskData:
    """A causal_lm or multiple_choice task from CSV/JSONL ``files`` (train, optionally validation and test) with
    ``columns`` by role (``TaskSpec.column``; a role not in it is read from the column of its own name). CSV cells are
    read as text."""
    if "train" not in files:
        raise DataError("task.files: a 'train' file is required")
    tables = {}
    for k, path in files.items():
        where = f"task.files.{k} ({path})"
        tables[k] = _Table(where, [_Row(where, i, r) for i, r in enumerate(_read_table(Path(path), as_text=True))])
    def cut_where(split: str) -> str:
        return f"task.files.{split} (cut from {files['train']} by split_seed {seed})"

    return _lm_tables_task(name, task_type, tables, cut_where, columns, tok, max_length, seed)


def load_hf_lm_task(dataset: str, config: str | None, splits: Mapping[str, str], task_type: TaskType,
                    columns: Mapping[str, str | Sequence[str]], tok: Tokenizer, max_length: int, seed: int = 0
                    ) -> TaskData:
    """A causal_lm or multiple_choice task from a ``datasets`` dataset; ``splits`` maps ours to the dataset's."""
    if "train" not in splits:
        raise DataError("task.hf_splits: a 'train' split is required")
    tables = {}
    for k, theirs in splits.items():
        where = f"task.hf_dataset {dataset!r} split {theirs!r}"
        tables[k] = _Table(where, [_Row(where, i, r) for i, r in enumerate(_load_hf_split(dataset, config, theirs))])
    def cut_where(split: str) -> str:
        return f"task.hf_splits.{split} (cut from {dataset!r} split {splits['train']!r} by split_seed {seed})"

    return _lm_tables_task(dataset, task_type, tables, cut_where, columns, tok, max_length, seed)
