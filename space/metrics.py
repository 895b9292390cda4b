"""The one table of metrics: direction, label and kind. The search, the pruner, the Pareto code, the hypervolume and
the dashboard all read it, so a new objective (a validation loss, say) works everywhere once it is listed here.

Kinds:
- ``rung``: measured on the validation split at every budget rung while a trial trains; the pruner compares
  trials on it. A search needs one such objective (its "quality" objective).
- ``size``: known in closed form before a trial trains (the trainable-parameter count), so the pruner can compare
  a trial with the ones no larger, and ``search.max_trainable`` can reject it before it starts.
- ``cost``: measured once a trial finishes (time, memory).
- ``report``: reported, never optimised (test accuracy: choosing on the test split leaks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Direction = Literal["max", "min"]
Kind = Literal["rung", "size", "cost", "report"]

METRICS: dict[str, tuple[Direction, str, Kind]] = {
    "val_accuracy": ("max", "validation accuracy", "rung"),
    "test_accuracy": ("max", "test accuracy (reported, never used to choose)", "report"),
    # causal_lm: mean negative log-likelihood per response token (nats), its exp, and greedy exact match
    "val_loss": ("min", "validation loss (nats per response token)", "rung"),
    "test_loss": ("min", "test loss (reported, never used to choose)", "report"),
    "val_perplexity": ("min", "validation perplexity", "rung"),
    "test_perplexity": ("min", "test perplexity (reported, never used to choose)", "report"),
    "val_exact_match": ("max", "validation exact match (greedy generation)", "rung"),
    "test_exact_match": ("max", "test exact match (reported, never used to choose)", "report"),
    "trainable_params": ("min", "trainable parameters", "size"),
    "trainable_pct": ("min", "trainable parameters (% of model)", "size"),
    "train_seconds": ("min", "training time (s)", "cost"),
    "peak_memory_mb": ("min", "peak memory (MB)", "cost"),
}

# The worst value a bounded metric can take (the hypervolume's reference where it has one).
WORST: dict[str, float] = {"val_accuracy": 0.0, "test_accuracy": 0.0, "val_exact_match": 0.0,
                           "test_exact_match": 0.0}

# What a space optimises when it names no objectives (a classification or multiple-choice task).
DEFAULT_OBJECTIVES = ("val_accuracy", "trainable_params")

# The quality metrics (rung and report kinds) each task type measures; size and cost metrics fit every type.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("val_accuracy", "test_accuracy"),
    "multiple_choice": ("val_accuracy", "test_accuracy"),
    "causal_lm": ("val_loss", "test_loss", "val_perplexity", "test_perplexity", "val_exact_match",
                  "test_exact_match"),
}


def default_objectives(task_type: str) -> tuple[str, ...]:
    """The objectives of a space that names none: the task type's first quality metric and the size."""
    return (TASK_METRICS[task_type][0], "trainable_params")


def fits_task(metric: str, task_type: str) -> bool:
    """Whether a task of ``task_type`` measures ``metric``."""
    return kind(metric) in ("size", "cost") or metric in TASK_METRICS[task_type]


def test_metric(quality: str) -> str:
    """The test-split twin of a validation metric (reported beside it, never used to choose)."""
    return "test_" + quality.removeprefix("val_")

# Metrics a search may optimise: every kind but ``report``.
OBJECTIVE_METRICS = tuple(m for m, (_, _, kind) in METRICS.items() if kind != "report")

# The trial states, one list: the same words in Optuna (the ``mps_state`` user attribute beside Optuna's own state),
# in MLflow's ``mps.status`` tag, on the terminal and in the dashboard.
TRIAL_STATES = ("running", "finished", "pruned", "failed", "interrupted", "duplicate", "rejected")


def direction(metric: str) -> Direction:
    try:
        return METRICS[metric][0]
    except KeyError:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None


def label(metric: str) -> str:
    return METRICS[metric][1] if metric in METRICS else metric


def kind(metric: str) -> Kind:
    return METRICS[metric][2]


def quality_metric(objectives: Sequence[str]) -> str:
    """The objective measured at every rung (the one the pruner and the front's "best" use)."""
    for m in objectives:
        if m in METRICS and kind(m) == "rung":
            return m
    raise ValueError(f"objectives {list(objectives)} name no metric measured while training; add one of "
                     f"{[m for m in METRICS if kind(m) == 'rung']}")


def size_metric(objectives: Sequence[str]) -> str | None:
    """The closed-form size objective, if the search has one."""
    return next((m for m in objectives if m in METRICS and kind(m) == "size"), None)


def better(metric: str, a: float, b: float) -> bool:
    """``a`` is strictly better than ``b`` on ``metric``."""
    return a > b if direction(metric) == "max" else a < b
