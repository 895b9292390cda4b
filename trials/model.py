"""The task wrappers every trial trains (a sequence classifier, or the causal LM itself) on any supported
architecture, and the loading names the rest of the project imports from here (``trials.models.loading`` holds
them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trials.models.loading import (
    ARCHITECTURES,
    EMBEDDED_CHECKPOINTS,
    EMBEDDED_DEFAULT,
    EMBEDDED_ENV,
    SUPPORTED_ARCHITECTURES,
    Architecture,
    CheckpointError,
    arch_of,
    architecture,
    check_architecture,
    embedded_name,
    load_base_model,
    resolve_checkpoint,
    ssm_mixers,
    use_scan,
)

__all__ = ["ARCHITECTURES", "EMBEDDED_CHECKPOINTS", "EMBEDDED_DEFAULT", "EMBEDDED_ENV", "SUPPORTED_ARCHITECTURES",
           "Architecture", "CheckpointError", "LanguageModel", "SequenceClassifier", "arch_of", "architecture",
           "check_architecture", "embedded_name", "load_base_model", "resolve_checkpoint", "ssm_mixers",
           "task_model", "use_scan"]


class _OnBackbone(nn.Module):
    """The hidden states of a causal LM's base model (``lm.base_model``: Mamba's ``backbone``, a hybrid's
    ``model``) for right-padded ``ids`` of ``lengths``, and the LM's logits for them."""

    lm: Any

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


class SequenceClassifier(_OnBackbone):
    """A base model with a linear head on the hidden state at the last real position (or their mean).

    Right padding is assumed: with a causal model the last real position has seen the whole example and
    padded positions after it cannot leak into it.
    """

    def __init__(self, lm: Any, num_classes: int, pooling: str = "last") -> None:
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"model.pooling: {pooling!r} is not one of 'last', 'mean'")
        self.lm = lm
        self.pooling = pooling
        hidden = lm.config.hidden_size
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.pooled(ids, lengths)  # [B, D]
        return self.head(hidden)  # [B, classes]

    def pooled(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        states = self.hidden(ids, lengths)  # [B, L, D]
        # Every index and mask is built on the states' device: `lengths` may come from the CPU side of a batch.
        lengths = lengths.to(states.device)
        if self.pooling == "last":
            idx = (lengths - 1).clamp(min=0)
            return states[torch.arange(states.shape[0], device=states.device), idx]  # [B, D]
        positions = torch.arange(ids.shape[1], device=states.device)
        mask = (positions[None, :] < lengths[:, None]).to(states.dtype)  # [B, L]
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]


class LanguageModel(_OnBackbone):
    """The causal LM itself, for ``causal_lm`` and ``multiple_choice`` tasks: no task head, the model's own
    (frozen, usually tied) output embeddings predict the next token."""

    head: nn.Module | None = None

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, V] next-token logits at every position."""
        return self.logits(self.hidden(ids, lengths))

    def continuation_logprobs(self, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood of each row's continuation ``ids[i, starts[i]:lengths[i]]`` given what precedes it.

        Returns ``(summed log-probability [B], continuation token count [B])``. Only the positions that predict a
        continuation token go through the output embeddings, so a large vocabulary costs [tokens, V], not [B, L, V].
        """
        lengths, starts = lengths.to(ids.device), starts.to(ids.device)
        hidden = self.hidden(ids, lengths)  # [B, L, D]
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L]
        predicts = (pos >= starts[:, None] - 1) & (pos < lengths[:, None] - 1)  # position t predicts ids[t + 1]
        rows, cols = predicts.nonzero(as_tuple=True)  # [T]
        logits = self.logits(hidden[rows, cols]).float()  # [T, V]
        token_lp = logits.log_softmax(-1).gather(1, ids[rows, cols + 1][:, None])[:, 0]  # [T]
        summed = torch.zeros(ids.shape[0], device=ids.device, dtype=token_lp.dtype).index_add(0, rows, token_lp)
        return summed, predicts.sum(1)


def task_model(lm: Any, task_type: str, num_classes: int, pooling: str) -> SequenceClassifier | LanguageModel:
    """The trainable model of a trial: a classifier for classification, the language model itself otherwise."""
    if task_type == "classification":
        return SequenceClassifier(lm, num_classes, pooling)
    return LanguageModel(lm)
