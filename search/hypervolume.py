"""Hypervolume of a search's front, in (quality objective) x log10(size objective).

The size axis is logarithmic because PEFT configurations span orders of magnitude (a head of 650 parameters,
LoRA of 10k, full fine-tuning of 150k): on a linear axis every small configuration would sit in one sliver.

Reference point (what a configuration must beat to add any volume):
- quality: a bounded metric uses its worst value (``space.metrics.WORST``: 0 for accuracy); a metric without one
  (a validation loss) uses the worst value any finished trial reached;
- size: full fine-tuning, log10 of the base model's parameter count (for ``trainable_pct``, log10(100)).
With no size objective the hypervolume is the best quality's distance from its reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from space.metrics import WORST, direction


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` and bounded by ``reference``, both coordinates minimised."""
    inside = sorted({p for p in points if p[0] < reference[0] and p[1] < reference[1]})
    area, best_y = 0.0, reference[1]
    for (x, y), nxt in zip(inside, [*inside[1:], (reference[0], 0.0)], strict=False):
        best_y = min(best_y, y)
        area += (nxt[0] - x) * (reference[1] - best_y)
    return area


def quality_reference(quality: str, values: Sequence[float]) -> float:
    if quality in WORST:
        return WORST[quality]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0
    return min(finite) if direction(quality) == "max" else max(finite)


def size_reference(size: str, base_params: int) -> float:
    return math.log10(100.0) if size == "trainable_pct" else math.log10(max(base_params, 1))


def search_hypervolume(rows: Sequence[dict[str, float]], quality: str, size: str | None, base_params: int) -> float:
    """Hypervolume of finished trials' ``rows`` (dicts holding the objective values)."""
    values = [float(r[quality]) for r in rows if quality in r and math.isfinite(float(r[quality]))]
    if not values:
        return 0.0
    sign = -1.0 if direction(quality) == "max" else 1.0  # minimise sign * quality
    q_ref = sign * quality_reference(quality, values)
    if size is None:
        return max(0.0, q_ref - min(sign * v for v in values))
    # A trial with nothing trainable (the base model as it is) counts as one parameter: log10 of 0 has no value.
    one = 100.0 / max(base_params, 1) if size == "trainable_pct" else 1.0
    points = [(sign * float(r[quality]), math.log10(max(float(r[size]), one))) for r in rows
              if quality in r and size in r and math.isfinite(float(r[quality]))]
    return hypervolume_2d(points, (q_ref, size_reference(size, base_params)))
