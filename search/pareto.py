"""Non-dominated filtering over finished trials, with directions from ``space.metrics``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from space.metrics import direction


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` when it is no worse in every objective and better in one (all maximised)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_indices(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[int]:
    """Indices of the rows on the Pareto front of ``metrics``. Rows missing a metric (or NaN) are skipped;
    callers pass finished trials only, since a stopped trial's metrics are not final."""
    signs = [1.0 if direction(m) == "max" else -1.0 for m in metrics]
    points: list[tuple[int, list[float]]] = []
    for i, row in enumerate(rows):
        values = [row.get(m) for m in metrics]
        if any(v is None or v != v for v in values):  # v != v is NaN
            continue
        points.append((i, [s * float(v) for s, v in zip(signs, values, strict=True)]))  # type: ignore[arg-type]
    return [i for i, p in points if not any(dominates(q, p) for j, q in points if j != i)]
