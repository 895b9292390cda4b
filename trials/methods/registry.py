"""The one registry of implemented methods; its order is the order methods are applied in."""

from __future__ import annotations

from trials.methods.a_log_delta import ALogDelta
from trials.methods.base import Method
from trials.methods.lora_in_proj import LoraInProj

REGISTRY: dict[str, Method] = {m.name: m for m in (LoraInProj(), ALogDelta())}
APPLY_ORDER = tuple(REGISTRY)
