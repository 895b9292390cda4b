"""A failed trial's reason: the exception type and message, read from Ray's error text for the trial.

Ray writes a trial's traceback to ``trial.error_file`` before it tells the scheduler, the searcher and the
callbacks (in that order) that the trial failed; ``RungScheduler`` hands the reason to the searcher, which keeps it
in the Optuna trial (``mps_error``), and the MLflow callback logs it as a tag and the whole text as ``error.txt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ERROR_ARTIFACT = "error.txt"


def error_text(trial: Any) -> str:
    """Ray's error text of a failed trial: its error file, else its error message."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", "") or "")


def error_reason(message: str) -> str:
    """The exception type and message of a trial's error text (Ray's "ray::ImplicitFunc..." traceback): the last
    line that reads ``SomeError: message`` (``torch.OutOfMemoryError: ...`` too), else the last non-empty line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head and " " not in head and (head.endswith(("Error", "Exception", "Interrupt")) or "." in head):
            return line
    return lines[-1] if lines else "unknown error"
