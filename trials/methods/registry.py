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


def supported(method: str, model_type: str) -> str | None:
    """None when ``method`` applies to models of ``model_type``, else the reason it does not (an unknown method or
    architecture is a reason too). Known without a model, so a space is checked before any trial starts."""
    from trials.models.interface import architecture_of, architectures

    if method not in REGISTRY:
        return f"unknown method {method!r}; implemented: {', '.join(REGISTRY)}"
    try:
        arch = architecture_of(model_type)
    except ValueError:
        return f"model_type {model_type!r} is not supported; supported: {', '.join(architectures())}"
    return REGISTRY[method].refusal(arch)


def support_table() -> dict[str, dict[str, str | None]]:
    """``{method: {model_type: None or the reason}}`` for every method and supported architecture."""
    from trials.models.interface import architectures

    return {m: {a: supported(m, a) for a in architectures()} for m in REGISTRY}


def support_markdown() -> str:
    """The method x architecture table for the README: "yes", or "no: <reason>"."""
    table = support_table()
    archs = list(next(iter(table.values())))
    lines = ["| method | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for method, row in table.items():
        cells = ["yes" if reason is None else f"no: {reason}".replace("|", "/") for reason in row.values()]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
