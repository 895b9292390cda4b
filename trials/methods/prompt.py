"""Prompt tuning (Lester et al. 2021; MambaPEFT's prompt-tuning with prefix, suffix and prefix+suffix sites).

n learned input embeddings are placed before the sequence (prefix), after its last real token (suffix), or both
(n each side). Because Mamba is causal, a suffix can only act through what is read after it: the output at an
example's last real token is taken from the last suffix position, so last-token pooling and next-token logits
both see the suffix; the other prompt positions are dropped, so the model returns one output per input
position. With ``projection`` the tokens pass through Linear(D, D) -> Tanh -> Linear(D, D) (MambaPEFT's
"w/ proj"). Init: copies of randomly drawn vocabulary embeddings (Lester et al.), which keeps their scale that of
real tokens (MambaPEFT uses N(0, 1)). Model-level count n D (x2 for prefix_suffix), + 2 D^2 + 2 D with the
projection. Not mergeable.

On hybrids the attention layers see the prompt too: positions are recounted over the new layout, and a decoding
step's positions and mask are shifted by the cached prefix. It runs as forward hooks of the base model
(transformers' ``MambaModel``, ``Mamba2Model``, ``BambaModel``, ...), so
``lm(input_ids)``, ``generate`` and any execution path see it. An ``attention_mask`` marks the real tokens (left
or right padding); the re-laid-out sequence is right-padded. During cached generation a prefix goes in once, at
the prefill call; a suffix cannot be cached (it must follow the newest token at every step), so a decoding step
with one raises.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from space.methods import PromptConfig
from trials.methods.base import mixers
from trials.models.interface import Architecture, ModelDims, architecture
from trials.models.mamba1_mixer import CACHE_KWARGS

ATTRIBUTE = "prompt_tuning"  # the backbone attribute holding the prompt module (merge refuses it)


class PromptTokens(nn.Module):
    def __init__(self, init: torch.Tensor, prefix: int, suffix: int, projection: bool) -> None:
        super().__init__()
        self.prefix, self.suffix = prefix, suffix
        self.tokens = nn.Parameter(init.clone())  # [prefix + suffix, D]
        width = init.shape[1]
        self.projection = (nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
                           if projection else None)
        self._layout: tuple[torch.Tensor, int] | None = None  # set by the pre-hook, read by the post-hook

    def embeddings(self) -> torch.Tensor:
        return self.tokens if self.projection is None else self.projection(self.tokens)  # [n, D]

    def insert(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] embeddings and [B, L] real-token mask -> [B, P + L + S, D] and its mask."""
        bt, length, width = embeds.shape
        p, s = self.prefix, self.suffix
        real = mask.bool()
        lengths = real.sum(1, keepdim=True)  # [B, 1]
        order = torch.argsort((~real).int(), dim=1, stable=True)  # real positions first, in order [B, L]
        t = torch.arange(p + length + s, device=embeds.device)[None]  # [1, T]
        # Source rows: [prompt tokens (p + s), the input (L), one zero row].
        k = (t - p).clamp(0, length - 1).expand(bt, -1)  # [B, T]
        index = torch.where(t < p, t, p + s + order.gather(1, k))
        in_suffix = (t >= p + lengths) & (t < p + lengths + s)
        index = torch.where(in_suffix, t - lengths, index)
        index = torch.where(t >= p + lengths + s, p + s + length, index)  # [B, T]
        prompt = self.embeddings().to(embeds.dtype)[None].expand(bt, -1, -1)  # [B, p + s, D]
        source = torch.cat([prompt, embeds, embeds.new_zeros(bt, 1, width)], dim=1)  # [B, p + s + L + 1, D]
        new = source.gather(1, index[..., None].expand(-1, -1, width))  # [B, T, D]
        out_index = torch.where(real, p + real.long().cumsum(1) - 1, p + lengths + s)  # [B, L]
        if s:
            out_index = torch.where(out_index == p + lengths - 1, p + lengths + s - 1, out_index)
        self._layout = (out_index.clamp(max=p + length + s - 1), length)
        return new, (t < p + lengths + s).to(mask.dtype)

    def extract(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, P + L + S, D] -> [B, L, D]: one output per input position (see the module docstring)."""
        assert self._layout is not None
        out_index, _ = self._layout
        return hidden.gather(1, out_index[..., None].expand(-1, -1, hidden.shape[-1]))


def _decoding(cache: Any) -> bool:
    """True on a cached generation step after the prefill (the prompt is already in the state)."""
    if cache is None:
        return False
    try:
        return cache.get_recurrent_state(0, state_idx=0) is not None
    except (AttributeError, IndexError, KeyError, TypeError):
        return False


def _install_hooks(backbone: nn.Module, prompt: PromptTokens, attention: bool, ids_scale: float) -> None:
    """``attention``: the model has attention layers (a hybrid), whose positions and masks count the prompt;
    ``ids_scale``: what the model multiplies the embeddings of input_ids by (and not given inputs_embeds)."""
    names = list(inspect.signature(backbone.forward).parameters)

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        bound = dict(zip(names, args, strict=False)) | kwargs
        if _decoding(next((bound[k] for k in CACHE_KWARGS if bound.get(k) is not None), None)):
            if prompt.suffix:
                # Uncached, the suffix follows the newest token at every step; a cache holds it where the prefill
                # put it, before the generated tokens: a different model, so refuse rather than generate from it.
                raise RuntimeError("prompt_tuning with a suffix cannot decode from a generation cache (the suffix "
                                   "must follow the newest token): generate with use_cache=False")
            prompt._layout = None
            if not attention or not prompt.prefix:
                return args, kwargs
            # The cache holds the prefix before the real tokens: a decoding step's positions and mask (counted by
            # generate over the real tokens) shift by its length.
            if bound.get("position_ids") is not None:
                bound["position_ids"] = bound["position_ids"] + prompt.prefix
            mask = bound.get("attention_mask")
            if mask is not None:
                bound["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], prompt.prefix), mask], dim=1)
            return (), bound
        embeds = bound.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(bound["input_ids"]) * ids_scale  # type: ignore[operator]
        mask = bound.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        new, new_mask = prompt.insert(embeds, mask)
        bound.update(input_ids=None, inputs_embeds=new,
                     attention_mask=None if bool(new_mask.all()) else new_mask)
        if bound.get("position_ids") is not None:  # counted over the inputs; the model recounts over the new layout
            bound["position_ids"] = None
        return (), bound

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if prompt._layout is None:
            return output
        if isinstance(output, tuple):
            return (prompt.extract(output[0]), *output[1:])
        output.last_hidden_state = prompt.extract(output.last_hidden_state)
        if output.hidden_states is not None:
            output.hidden_states = tuple(prompt.extract(h) for h in output.hidden_states)
        prompt._layout = None
        return output

    backbone.register_forward_pre_hook(before, with_kwargs=True)
    backbone.register_forward_hook(after, with_kwargs=True)


class PromptTuning:
    name = "prompt_tuning"
    mergeable = False
    identity_at_init = False

    @staticmethod
    def sites(cfg: PromptConfig) -> tuple[int, int]:
        return (cfg.tokens if cfg.position != "suffix" else 0, cfg.tokens if cfg.position != "prefix" else 0)

    def refusal(self, arch: Architecture) -> str | None:
        return None

    def count(self, cfg: PromptConfig, dims: ModelDims) -> int:
        prefix, suffix = self.sites(cfg)
        return (prefix + suffix) * dims.D + (2 * dims.D * dims.D + 2 * dims.D if cfg.projection else 0)

    def apply(self, lm: Any, cfg: PromptConfig) -> list[nn.Parameter]:
        mixers(lm)
        backbone: Any = lm.base_model  # MambaModel / Mamba2Model: takes input_ids or inputs_embeds
        table = lm.get_input_embeddings().weight
        prefix, suffix = self.sites(cfg)
        arch = architecture(lm)
        scale = float(getattr(lm.config, arch.ids_embedding_multiplier)) if arch.ids_embedding_multiplier else 1.0
        rows = torch.randint(0, table.shape[0], (prefix + suffix,))
        prompt = PromptTokens(table.detach()[rows.to(table.device)].float() * scale, prefix, suffix, cfg.projection)
        setattr(backbone, ATTRIBUTE, prompt.to(table.device))
        _install_hooks(backbone, prompt, arch.attention, scale)
        return list(prompt.parameters())


PROMPT_METHODS = [PromptTuning()]
