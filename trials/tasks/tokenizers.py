"""The tokenizer a task's text goes through: the checkpoint's own, or the embedded byte vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from space.config import ModelSpec
from trials.models.loading import resolve_checkpoint
from trials.models.vocab import ByteTokenizer
from trials.tasks.base import DataError


class Tokenizer(Protocol):
    # Appended to every causal_lm response so that generation learns to stop; None: the tokenizer has no such token.
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def format_prompt(self, text: str) -> str:
        """A causal_lm prompt as the model expects it (a chat model's template, or the text as it is)."""
        ...


class HFTokenizer:
    """A checkpoint's own tokenizer (no special tokens added: pooling reads the last real position)."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(name_or_path)
        self.eos_id: int | None = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def format_prompt(self, text: str) -> str:
        """The user turn of the tokenizer's chat template followed by the assistant's opening, when it has one."""
        if not getattr(self._tok, "chat_template", None):
            return text
        messages = [{"role": "user", "content": text}]
        return str(self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def make_tokenizer(model: ModelSpec) -> Tokenizer:
    """``auto``: the checkpoint's own tokenizer when its directory has one, else the byte tokenizer."""
    if model.tokenizer == "bytes":
        return ByteTokenizer()
    source = resolve_checkpoint(model.checkpoint) if model.tokenizer == "auto" else model.tokenizer
    if model.tokenizer == "auto":
        local = Path(source)
        has_files = local.is_dir() and any((local / f).exists() for f in (
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))
        if not has_files:
            return ByteTokenizer()
    try:
        return HFTokenizer(source)
    except Exception as exc:
        raise DataError(f"model.tokenizer: cannot load a tokenizer from {source!r}: {exc}") from exc
