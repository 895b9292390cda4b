"""The embedded checkpoints' vocabulary: byte-level text and pixel intensities in one id space.

0 = pad, 1 = cls, 2 = sep (also eos), 3..258 = bytes, 259..275 = pixel intensities 0..16. The embedded models, the
tiny fixtures, the built-in tasks and the pretraining corpora all use it; a user's checkpoint with its own tokenizer
uses that tokenizer for text (``trials.tasks.tokenizers``).
"""

from __future__ import annotations

from collections.abc import Sequence

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
BYTE_OFFSET = 3
PIXEL_OFFSET = BYTE_OFFSET + 256
PIXEL_LEVELS = 17
EMBEDDED_VOCAB_SIZE = 288  # 276 used ids rounded up to a multiple of 16


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids; the embedded model's tokenizer."""

    eos_id: int | None = SEP_ID  # the embedded checkpoint's eos_token_id

    def encode(self, text: str) -> list[int]:
        return [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < PIXEL_OFFSET).decode("utf-8", "replace")

    def format_prompt(self, text: str) -> str:
        return text
