"""The standard-library tasks, made from the public functions and methods of ``trials.heldout.STDLIB_TASK_MODULES``
(none of which the embedded models were pretrained on); any function whose summary line occurs in the pretraining
text is left out. They come from the running interpreter, so their rows (and split sizes) depend on the Python minor
version.

- ``stdlib_docstrings`` (causal_lm): given a standard-library function's name and signature
  (``difflib.get_close_matches(word, possibilities, n=3, cutoff=0.6)``), write the first line of its docstring.
- ``stdlib_functions`` (multiple_choice): given that first line, pick the function among four names.
- ``stdlib_modules`` (classification): which of eight modules a function comes from, by its name, signature and
  summary.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from space.config import TaskSpec
from trials.heldout import STDLIB_TASK_MODULES, stdlib_text
from trials.models.vocab import ByteTokenizer
from trials.tasks.base import TaskData, make_split
from trials.tasks.interface import TaskKind
from trials.tasks.tokenizers import Tokenizer
from trials.tasks.types.causal_lm import encode_lm_split, lm_task
from trials.tasks.types.multiple_choice import ChoiceExample, encode_choice_split

T = TypeVar("T")

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


@functools.cache
def stdlib_functions() -> tuple[StdlibFunction, ...]:
    """Every public function and method of STDLIB_TASK_MODULES with a docstring and a signature, sorted by name.

    A function whose summary line occurs anywhere in the pretraining text is left out, so no answer of either
    stdlib task was seen in pretraining. The set depends on the Python minor version.
    """
    corpus = stdlib_text()
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
                   tok, max_length, encode_lm_split)


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
                   tokenizer or ByteTokenizer(), max_length, encode_choice_split)


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


class StdlibDocstrings:
    inputs = "text"

    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        return load_stdlib_docstrings_task(task.split_seed, tokenizer(), task.max_length)

    def class_names(self, task: TaskSpec) -> list[str]:
        return []

    def input_length(self, task: TaskSpec) -> int:
        return task.max_length


class StdlibFunctions(StdlibDocstrings):
    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        return load_stdlib_functions_task(task.split_seed, tokenizer(), task.max_length)


class StdlibModules(StdlibDocstrings):
    def load(self, task: TaskSpec, kind: TaskKind, tokenizer: Callable[[], Tokenizer]) -> TaskData:
        return load_stdlib_modules_task(task.split_seed, task.shots_per_class, tokenizer(), task.max_length)

    def class_names(self, task: TaskSpec) -> list[str]:
        return list(STDLIB_MODULE_CLASSES)


DOCSTRINGS, FUNCTIONS, MODULES = StdlibDocstrings(), StdlibFunctions(), StdlibModules()
