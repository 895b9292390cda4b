"""The one registry of implemented methods; its order is the order methods are applied in."""

from __future__ import annotations

from trials.methods.adapter import ADAPTER_METHODS
from trials.methods.base import Method
from trials.methods.lora import LORA_METHODS
from trials.methods.partial import PARTIAL_METHODS

METHODS: list[Method] = [*LORA_METHODS, *PARTIAL_METHODS, *ADAPTER_METHODS]
REGISTRY: dict[str, Method] = {m.name: m for m in METHODS}
APPLY_ORDER = tuple(REGISTRY)
