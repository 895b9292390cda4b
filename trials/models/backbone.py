"""The base model's hidden states and logits, the same way for every supported architecture: what the task types'
trainable models (``trials.tasks.types``) are built on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trials.models.loading import arch_of


class OnBackbone(nn.Module):
    """The hidden states of a causal LM's base model (``lm.base_model``: Mamba's ``backbone``, a hybrid's
    ``model``) for right-padded ``ids`` of ``lengths``, and the LM's logits for them."""

    lm: Any  # the base causal LM
    head: nn.Module | None  # the task head (classification), or None where the LM's own output predicts

    @property
    def backbone(self) -> Any:
        return self.lm.base_model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] the embeddings the base model would look up itself (with its input scale)."""
        scale = arch_of(self.lm).input_scale(self.lm.config)
        embeds = self.lm.get_input_embeddings()(ids)  # [B, L, D]
        return embeds * scale if scale != 1.0 else embeds

    def hidden(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] hidden states of the last layer (after the final norm)."""
        inputs = self.embed(ids)  # [B, L, D]
        # Prompt tuning places a suffix after each example's last real token, so it needs to know them; other
        # methods do not, and without a mask the fused CUDA path stays available. (Right padding and causal
        # attention keep a hybrid's real positions from seeing the padding without a mask too.)
        mask = None
        if getattr(self.backbone, "prompt_tuning", None) is not None:
            mask = (torch.arange(ids.shape[1], device=ids.device)[None, :]
                    < lengths.to(ids.device)[:, None]).long()  # [B, L]
        # No generation cache: with one, transformers (and so our mixer) take the step-by-step cached path.
        return self.backbone(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] hidden states -> [..., V] the LM's next-token logits (its ``lm_head`` and output scale)."""
        scale = arch_of(self.lm).output_scale(self.lm.config)
        logits = self.lm.get_output_embeddings()(hidden)  # [..., V]
        return logits * scale if scale != 1.0 else logits
