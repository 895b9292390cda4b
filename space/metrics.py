"""The one table of metric directions: the search, the Pareto code and the dashboard all read it."""

from __future__ import annotations

from typing import Literal

Direction = Literal["max", "min"]

METRICS: dict[str, tuple[Direction, str]] = {
    "val_accuracy": ("max", "validation accuracy"),
    "test_accuracy": ("max", "test accuracy (reported, never used to choose)"),
    "trainable_params": ("min", "trainable parameters"),
    "trainable_pct": ("min", "trainable parameters (% of model)"),
    "train_seconds": ("min", "training time (s)"),
    "peak_memory_mb": ("min", "peak memory (MB)"),
}

# Metrics a search may optimise. Test accuracy is excluded on purpose: choosing on the test split leaks it.
OBJECTIVE_METRICS = ("val_accuracy", "trainable_params", "trainable_pct", "train_seconds", "peak_memory_mb")


def direction(metric: str) -> Direction:
    try:
        return METRICS[metric][0]
    except KeyError:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}") from None


def label(metric: str) -> str:
    return METRICS[metric][1] if metric in METRICS else metric
