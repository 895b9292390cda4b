"""A failed trial's reason (the exception type and message) and its traceback.

Two kinds of failure, kept apart because only one is worth running again:
- The trial's own code raised (a NaN loss, an out-of-memory error, a bug in a configuration): ``trainable`` catches
  it and makes it the trial's last report (``failure_report``), so Ray sees a trial that ended, and running it
  again would fail again. The searcher records it as FAIL with its reason (``mps_error`` in Optuna), the MLflow
  callback tags the run and logs the traceback as ``error.txt``.
- The process running the trial died (its node was lost, the process was killed): Ray raises an actor error and,
  up to ``search.max_restarts`` times, starts the trial again from its start on whatever node is alive. Beyond
  that, Ray writes the error to ``trial.error_file`` before it tells the scheduler, the searcher and the callbacks
  (in that order) that the trial failed; ``RungScheduler`` hands the reason to the searcher and the callback logs
  the error text, as for a failure of the trial's own.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

ERROR_ARTIFACT = "error.txt"
# Keys of the last report of a trial whose own code raised.
FAILED = "trial_error"
TRACEBACK = "trial_traceback"


def failure_report(exc: BaseException) -> dict[str, str]:
    """The last report of a trial that raised ``exc``: its reason and the whole traceback (call inside ``except``)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    lines = str(exc).strip().splitlines()
    return {FAILED: f"{name}: {lines[0]}" if lines else name, TRACEBACK: traceback.format_exc()}


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
