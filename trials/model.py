"""Base model loading and the sequence-classification wrapper used by every trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tiny-mamba"


def resolve_checkpoint(name: str) -> str:
    """``embedded`` means the tiny pretrained Mamba shipped with the package; anything else is a local
    directory or a Hugging Face model id, loaded through the same ``from_pretrained`` path."""
    return str(EMBEDDED_CHECKPOINT) if name == "embedded" else name


def load_base_model(checkpoint: str, scan: str = "auto") -> Any:
    """Load a Mamba-1 causal LM checkpoint with ``from_pretrained`` and set its selective scan."""
    from transformers import MambaForCausalLM

    path = resolve_checkpoint(checkpoint)
    try:
        model = MambaForCausalLM.from_pretrained(path)
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot load {checkpoint!r} ({path}): {exc}") from exc
    return use_scan(model, scan)


def use_scan(lm: Any, scan: str) -> Any:
    """``auto``, ``compiled`` and ``torch`` install the project's mixer (``trials.mixer``); ``mambapy`` and
    ``hf_loop`` keep transformers' own paths (``use_mambapy=True`` / the default loop)."""
    from transformers.models.mamba.modeling_mamba import MambaMixer

    from trials.mixer import install_fast_mixer

    if scan in ("auto", "compiled", "torch"):
        install_fast_mixer(lm, scan)  # type: ignore[arg-type]
    elif scan in ("mambapy", "hf_loop"):
        for module in lm.modules():
            if isinstance(module, MambaMixer):
                module.use_mambapy = scan == "mambapy"
    else:
        raise ValueError(f"model.scan: {scan!r} is not one of auto, compiled, torch, mambapy, hf_loop")
    return lm


class SequenceClassifier(nn.Module):
    """A Mamba backbone with a linear head on the hidden state at the last real position (or their mean).

    Right padding is assumed: with a causal model the last real position has seen the whole example and
    padded positions after it cannot leak into it.
    """

    def __init__(self, lm: Any, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"model.pooling: {pooling!r} is not one of 'last', 'mean'")
        self.lm: Any = lm
        self.pooling = pooling
        hidden = lm.config.hidden_size
        self.head = nn.Linear(hidden, num_classes)

    @property
    def backbone(self) -> Any:
        return self.lm.backbone

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.pooled(ids, lengths)  # [B, D]
        return self.head(hidden)  # [B, classes]

    def pooled(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        inputs = self.embed(ids)  # [B, L, D]
        # Prompt tuning places a suffix after each example's last real token, so it needs to know them; other
        # methods do not, and without a mask the fused CUDA path stays available.
        mask = None
        if getattr(self.backbone, "prompt_tuning", None) is not None:
            mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()  # [B, L]
        # No generation cache: with one, transformers (and so our mixer) take the step-by-step cached path.
        states = self.backbone(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        if self.pooling == "last":
            idx = (lengths - 1).clamp(min=0)
            return states[torch.arange(states.shape[0]), idx]  # [B, D]
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).to(states.dtype)  # [B, L]
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(ids)
