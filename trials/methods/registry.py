"""The one registry of implemented methods; its order is the order methods are applied in.

Weight deltas come first, so that each reads the pretrained shapes; SDT indexes A_log's states and x_proj's B/C
rows, so it precedes additional-scan, which enlarges both; the methods that add inputs, states or branches
come last.
"""

from __future__ import annotations

from trials.methods.adapter import ADAPTER_METHODS
from trials.methods.base import Method
from trials.methods.lora import LORA_METHODS
from trials.methods.partial import PARTIAL_METHODS
from trials.methods.prodial import PRODIAL_METHODS
from trials.methods.prompt import PROMPT_METHODS
from trials.methods.sdt import SDT
from trials.methods.state import ADDITIONAL_SCAN_METHODS, AFFIX_METHODS, STATE_METHODS

METHODS: list[Method] = [*LORA_METHODS, *PRODIAL_METHODS, *PARTIAL_METHODS, SDT, *ADDITIONAL_SCAN_METHODS,
                         *ADAPTER_METHODS, *AFFIX_METHODS, *STATE_METHODS, *PROMPT_METHODS]
REGISTRY: dict[str, Method] = {m.name: m for m in METHODS}
APPLY_ORDER = tuple(REGISTRY)
