"""What the embedded models were pretrained on, and what the built-in tasks hold out of it.

The stdlib text tasks (``trials.tasks.sources.stdlib``) are made from the modules in ``STDLIB_TASK_MODULES``; the
``stdlib`` pretraining corpus leaves those modules out, and the tasks in turn drop any function whose summary line
occurs in the corpus. Both sides read this module, so it sits below both: the tasks never import the pretraining
recipes (``trials.pretraining``), which trials never need at run time.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from trials.models.vocab import ByteTokenizer

# Pure-Python standard-library modules whose public functions and methods make the three stdlib tasks. None is in
# the pretraining corpora of the embedded models (``stdlib_files`` leaves them out) or pydoc_data; modules whose
# signatures differ by machine (os, posixpath, platform, selectors) are left out so every machine with the same Python
# minor version builds the same tasks.
STDLIB_TASK_MODULES = (
    "base64", "bdb", "calendar", "cmd", "code", "codecs", "configparser", "contextlib", "csv", "difflib", "dis",
    "email.message", "email.utils", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "getopt", "glob",
    "graphlib", "gzip", "heapq", "hmac", "html", "http.client", "http.cookies", "imaplib", "ipaddress", "locale",
    "mailbox", "mimetypes", "optparse", "pickle", "poplib", "pprint", "queue", "quopri", "sched", "secrets", "shlex",
    "smtplib", "symtable", "tarfile", "tempfile", "threading", "tokenize", "traceback", "urllib.parse",
    "urllib.request", "uuid", "weakref", "zipfile",
)

STDLIB_FILES = ("argparse.py", "collections/__init__.py", "dataclasses.py", "functools.py", "inspect.py",
                "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py", "random.py",
                "shutil.py", "statistics.py", "string.py", "textwrap.py", "typing.py", "subprocess.py")


# Never in the ``stdlib`` corpus: tests and demos, GUI and packaging tooling, codec tables, and pydoc_data (the
# pydoc_topics task); plus the top-level packages of STDLIB_TASK_MODULES (the stdlib tasks), added below.
EXCLUDED_DIRS = ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "encodings",
                 "pydoc_data", "site-packages", "dist-packages", "__pycache__", "__phello__")
CORPORA = ("tiny", "stdlib")  # read from this machine's standard library at training time


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out_names() -> set[str]:
    """Top-level names (module or package) the ``stdlib`` corpus leaves out for the downstream tasks."""
    return {m.split(".")[0] for m in STDLIB_TASK_MODULES}


def stdlib_files(corpus: str = "stdlib") -> list[str]:
    """The corpus's files, relative to the standard-library directory, in a fixed order."""
    if corpus == "tiny":
        return list(STDLIB_FILES)
    if corpus != "stdlib":
        raise ValueError(f"--corpus: {corpus!r} is not one of {', '.join(CORPORA)}")
    root, held_out = stdlib_root(), held_out_names()
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        top = parts[0].removesuffix(".py")
        if top in held_out or any(part in EXCLUDED_DIRS or part.startswith("config-") for part in parts):
            continue
        files.append(path.relative_to(root).as_posix())
    return files


def stdlib_text(corpus: str = "stdlib") -> str:
    """The corpus's files, read and concatenated (the held-out filter of the stdlib tasks reads it as text)."""
    root = stdlib_root()
    return "".join((root / rel).read_text(encoding="utf-8", errors="replace") for rel in stdlib_files(corpus))


def text_corpus(corpus: str = "stdlib") -> list[int]:
    """The corpus as the embedded models' byte tokens."""
    return ByteTokenizer().encode(stdlib_text(corpus))
