"""Base model loading and the sequence-classification wrapper used by every trial."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
# The pretrained checkpoints shipped with the package, by the name ``model.checkpoint`` takes
# (``trials.pretrain.RECIPES`` makes them).
EMBEDDED_CHECKPOINTS = {"embedded-small": ASSETS / "small-mamba", "embedded-tiny": ASSETS / "tiny-mamba"}
# What ``embedded`` means. The environment variable names another embedded checkpoint instead (the test suite
# sets embedded-tiny, for speed); it is read on every call, so Ray workers started from that environment agree.
EMBEDDED_DEFAULT = "embedded-small"
EMBEDDED_ENV = "MAMBA_PEFT_EMBEDDED"


def embedded_name(name: str = "embedded") -> str:
    """The embedded checkpoint ``name`` stands for (``embedded`` follows MAMBA_PEFT_EMBEDDED when it is set)."""
    if name == "embedded":
        name = os.environ.get(EMBEDDED_ENV) or EMBEDDED_DEFAULT
        where = f"{EMBEDDED_ENV}={name}"
    else:
        where = f"model.checkpoint: {name}"
    if name not in EMBEDDED_CHECKPOINTS:
        raise FileNotFoundError(f"{where}: no such embedded checkpoint (there are: embedded, "
                                f"{', '.join(EMBEDDED_CHECKPOINTS)})")
    return name


def resolve_checkpoint(name: str) -> str:
    """``embedded`` (the small pretrained Mamba), ``embedded-small`` or ``embedded-tiny`` name a checkpoint shipped
    with the package; anything else is a local directory or a Hugging Face model id, loaded through the same
    ``from_pretrained`` path."""
    if name == "embedded" or name in EMBEDDED_CHECKPOINTS:
        return str(EMBEDDED_CHECKPOINTS[embedded_name(name)])
    return name


# The architectures a trial can fine-tune, by the config's ``model_type``: the transformers class each loads as.
SUPPORTED_ARCHITECTURES = {"mamba": "MambaForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint the project cannot fine-tune as it is: another architecture, or weights that do not fit."""


def check_architecture(config: Any, checkpoint: str) -> None:
    """Refuse a config whose ``model_type`` is not supported, naming what it is and what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        found = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        supported = ", ".join(f"{cls} (model_type {t!r})" for t, cls in SUPPORTED_ARCHITECTURES.items())
        raise CheckpointError(f"model.checkpoint: {checkpoint!r} is a {model_type!r} model ({found}); supported: "
                              f"{supported}")


def _weight_name(key: Any) -> str:
    """A key of transformers' loading info: a name, or (name, checkpoint shape, model shape) for a mismatch."""
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} (checkpoint {list(key[1])}, model {list(key[2])})"
    return str(key)


def load_base_model(checkpoint: str, scan: str = "auto") -> Any:
    """Load a Mamba-1 causal LM checkpoint with ``from_pretrained`` and set its selective scan.

    Nothing is initialised silently: another architecture, or any weight the checkpoint lacks, has in excess or
    holds in another shape, is a ``CheckpointError`` that names them (transformers would only log it).
    """
    from transformers import AutoConfig, MambaForCausalLM

    path = resolve_checkpoint(checkpoint)
    try:
        config = AutoConfig.from_pretrained(path)
        check_architecture(config, checkpoint)
        # Mismatched shapes are reported in `info` (and refused below) rather than raised without their names.
        loaded: Any = MambaForCausalLM.from_pretrained(path, config=config, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)
        model, info = loaded
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot load {checkpoint!r} ({path}): {exc}") from exc
    problems = {kind: sorted(_weight_name(k) for k in info.get(f"{kind}_keys") or ())
                for kind in ("missing", "unexpected", "mismatched")}
    if any(problems.values()):
        said = "; ".join(f"{len(keys)} {kind} weight(s): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                         for kind, keys in problems.items() if keys)
        raise CheckpointError(f"model.checkpoint: {checkpoint!r} ({path}) does not fit {type(model).__name__}: "
                              f"{said}. Nothing was initialised in their place.")
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


class _OnBackbone(nn.Module):
    """The hidden states of a Mamba causal LM's backbone for right-padded ``ids`` of ``lengths``."""

    lm: Any

    @property
    def backbone(self) -> Any:
        return self.lm.backbone

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(ids)

    def hidden(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] hidden states of the last layer (after the final norm)."""
        inputs = self.embed(ids)  # [B, L, D]
        # Prompt tuning places a suffix after each example's last real token, so it needs to know them; other
        # methods do not, and without a mask the fused CUDA path stays available.
        mask = None
        if getattr(self.backbone, "prompt_tuning", None) is not None:
            mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()  # [B, L]
        # No generation cache: with one, transformers (and so our mixer) take the step-by-step cached path.
        return self.backbone(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state


class SequenceClassifier(_OnBackbone):
    """A Mamba backbone with a linear head on the hidden state at the last real position (or their mean).

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
        if self.pooling == "last":
            idx = (lengths - 1).clamp(min=0)
            return states[torch.arange(states.shape[0], device=states.device), idx]  # [B, D]
        positions = torch.arange(ids.shape[1], device=lengths.device)
        mask = (positions[None, :] < lengths[:, None]).to(states.dtype)  # [B, L]
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]


class LanguageModel(_OnBackbone):
    """The causal LM itself, for ``causal_lm`` and ``multiple_choice`` tasks: no task head, the model's own
    (frozen, usually tied) ``lm_head`` predicts the next token."""

    head: nn.Module | None = None

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, V] next-token logits at every position."""
        return self.lm.lm_head(self.hidden(ids, lengths))

    def continuation_logprobs(self, ids: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood of each row's continuation ``ids[i, starts[i]:lengths[i]]`` given what precedes it.

        Returns ``(summed log-probability [B], continuation token count [B])``. Only the positions that predict a
        continuation token go through ``lm_head``, so a large vocabulary costs [tokens, V], not [B, L, V].
        """
        hidden = self.hidden(ids, lengths)  # [B, L, D]
        pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, L]
        predicts = (pos >= starts[:, None] - 1) & (pos < lengths[:, None] - 1)  # position t predicts ids[t + 1]
        rows, cols = predicts.nonzero(as_tuple=True)  # [T]
        logits = self.lm.lm_head(hidden[rows, cols]).float()  # [T, V]
        token_lp = logits.log_softmax(-1).gather(1, ids[rows, cols + 1][:, None])[:, 0]  # [T]
        summed = torch.zeros(ids.shape[0], device=ids.device, dtype=token_lp.dtype).index_add(0, rows, token_lp)
        return summed, predicts.sum(1)


def task_model(lm: Any, task_type: str, num_classes: int, pooling: str) -> SequenceClassifier | LanguageModel:
    """The trainable model of a trial: a classifier for classification, the language model itself otherwise."""
    if task_type == "classification":
        return SequenceClassifier(lm, num_classes, pooling)
    return LanguageModel(lm)
