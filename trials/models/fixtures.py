"""Tiny random-init checkpoints of every supported architecture, for tests and examples (no hub is reachable).

The sizes follow ../shared/reference/mamba2-hybrids.md: hidden 32, Mamba-2 mixers with 16 heads of 4 channels,
one B/C group and state 16, SSD chunks of 8 tokens, attention at layers 1 and 3 of 4. Granite's and FalconH1's
embedding and logit multipliers are set away from 1, as their released models have them, so that code which
forgets them gives other logits. The vocabulary is the
embedded one (``trials.models.vocab``: 0 pad, 1 cls, 2 sep), so every task of the project runs on them.

    python -m trials.models.loading --write-fixture bamba /tmp/tiny-bamba
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trials.models.vocab import EMBEDDED_VOCAB_SIZE, PAD_ID

_TOKENS: dict[str, Any] = {"vocab_size": EMBEDDED_VOCAB_SIZE, "pad_token_id": PAD_ID, "bos_token_id": 1,
                           "eos_token_id": 2}
# The Mamba-2 mixer of every hybrid: inner width 2 * 32 = 16 heads x 4.
_HYBRID: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                           "num_attention_heads": 4, "num_key_value_heads": 2, **_TOKENS}


def _mamba() -> Any:
    from transformers import MambaConfig

    return MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=2, **_TOKENS)


def _mamba2() -> Any:
    from transformers import Mamba2Config

    return Mamba2Config(hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=8, state_size=2,
                        chunk_size=8, expand=2, **_TOKENS)


def _bamba() -> Any:
    from transformers import BambaConfig

    return BambaConfig(mamba_n_heads=16, mamba_d_head=4, mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=8,
                       attn_layer_indices=[1, 3], **_HYBRID)


def _granitemoehybrid() -> Any:
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(mamba_n_heads=16, mamba_d_head=4, mamba_d_state=16, mamba_n_groups=1,
                                  mamba_chunk_size=8, layer_types=["mamba", "attention", "mamba", "attention"],
                                  shared_intermediate_size=174, num_local_experts=4, num_experts_per_tok=2,
                                  embedding_multiplier=12.0, logits_scaling=4.0, **_HYBRID)


def _falcon_h1() -> Any:
    from transformers import FalconH1Config

    # FalconH1 runs attention beside the mixer in every layer; two layers keep it as small as the others.
    return FalconH1Config(**(_HYBRID | {"num_hidden_layers": 2}), mamba_n_heads=16, mamba_d_head=4, mamba_d_ssm=64,
                          mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=8, embedding_multiplier=2.0,
                          lm_head_multiplier=0.5)


def _nemotron_h() -> Any:
    from transformers import NemotronHConfig

    # linear_attention is NemotronH's name for a Mamba-2 mixer layer.
    return NemotronHConfig(**(_HYBRID | {"num_hidden_layers": None}),
                           layers_block_type=["linear_attention", "full_attention", "linear_attention", "mlp"],
                           mamba_num_heads=16, mamba_head_dim=4,
                           ssm_state_size=16, n_groups=1, chunk_size=8, head_dim=8)


FIXTURES: dict[str, Callable[[], Any]] = {"mamba": _mamba, "mamba2": _mamba2, "bamba": _bamba,
                                          "granitemoehybrid": _granitemoehybrid, "falcon_h1": _falcon_h1,
                                          "nemotron_h": _nemotron_h}


def tiny_config(model_type: str) -> Any:
    """The tiny config of ``model_type`` (one of FIXTURES)."""
    if model_type not in FIXTURES:
        raise ValueError(f"--write-fixture: {model_type!r} is not one of {', '.join(FIXTURES)}")
    return FIXTURES[model_type]()


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A tiny random-init causal LM of ``model_type``, seeded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type))


def write_fixture(model_type: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random ``model_type`` to ``out`` with ``save_pretrained`` (config.json + model.safetensors)."""
    out.mkdir(parents=True, exist_ok=True)
    tiny_model(model_type, seed).save_pretrained(out)
    return out
