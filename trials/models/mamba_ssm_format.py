"""Checkpoints in mamba-ssm's own layout (as state-spaces publishes them), converted in memory on load.

A mamba-ssm directory has a ``config.json`` with ``d_model``, ``n_layer``, ``vocab_size``, ``ssm_cfg`` (a Mamba-2
when ``ssm_cfg.layer == "Mamba2"``, a Mamba-1 otherwise), ``pad_vocab_size_multiple``, ``tie_embeddings``, ... and
its weights (``pytorch_model.bin`` or ``model.safetensors``) named ``backbone.embedding.weight``,
``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight`` and
``lm_head.weight``. ``convert`` maps the config onto transformers' ``MambaConfig`` / ``Mamba2Config`` (the vocabulary
padded up to ``pad_vocab_size_multiple`` as mamba-ssm pads it) and renames the weights; the loader then builds the
model from that state dict with the same strict checks as any checkpoint, so a missing or extra weight is named.
Nothing is written to disk: the conversion is a rename, cheap enough to redo on every load, and a cache would need
invalidating when the checkpoint changes.

transformers 5.24 ships no conversion code for this in the package (its ``models/mamba`` and ``models/mamba2``
hold only the configuration and modeling modules; the conversion scripts live in its source repository only), and
its loader cannot read this config (no ``model_type``); so the mapping is written here.

mamba-ssm options transformers' models cannot express are refused with the option named: MLP blocks
(``d_intermediate`` > 0), attention layers (``attn_layer_idx``), LayerNorm instead of RMSNorm, and on Mamba-2 a
partial SSM width (``d_ssm``), D per channel (``D_has_hdim``), an ungated or norm-before-gate output norm.
Initialisation-only options (``dt_min``, ``A_init_range``, ...) are carried over where transformers has them. A
mamba-ssm config names no special tokens (its tokenizer is a separate repository), so the converted config keeps
transformers' default token ids; they matter to generation only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from trials.models.interface import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# ssm_cfg keys mamba-ssm's Mamba (mamba_simple.py) and Mamba2 (mamba2.py) take, with their defaults.
MAMBA1_DEFAULTS: dict[str, Any] = {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001,
                                   "dt_max": 0.1, "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4,
                                   "conv_bias": True, "bias": False, "use_fast_path": True, "layer": "Mamba1"}
MAMBA2_DEFAULTS: dict[str, Any] = {"d_state": 128, "d_conv": 4, "conv_init": None, "expand": 2, "headdim": 64,
                                   "d_ssm": None, "ngroups": 1, "A_init_range": [1, 16], "D_has_hdim": False,
                                   "rmsnorm": True, "norm_before_gate": False, "dt_min": 0.001, "dt_max": 0.1,
                                   "dt_init_floor": 1e-4, "dt_limit": [0.0, float("inf")], "bias": False,
                                   "conv_bias": True, "chunk_size": 256, "use_mem_eff_path": True,
                                   "layer": "Mamba2"}
# Top-level keys of mamba-ssm's MambaConfig (config_mamba.py).
TOP_KEYS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
            "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
# mamba-ssm's MixerModel builds every norm with this epsilon (it is not in the config).
NORM_EPS = 1e-5


def is_mamba_ssm(path: str | Path) -> bool:
    """Whether ``path`` is a local directory whose config.json is mamba-ssm's (``d_model`` and ``n_layer``, no
    ``model_type``) rather than transformers'."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    raw = json.loads(config.read_text())
    return isinstance(raw, dict) and "d_model" in raw and "n_layer" in raw and "model_type" not in raw


def _refuse(where: str, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: {what}; transformers' Mamba models cannot express it, so this mamba-ssm "
                           "checkpoint cannot be converted")


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """The embedding rows mamba-ssm allocates: ``vocab_size`` rounded up to a multiple of ``multiple``."""
    return vocab_size if multiple <= 1 else math.ceil(vocab_size / multiple) * multiple


def to_transformers_config(raw: dict[str, Any], where: str = "config.json") -> Any:
    """transformers' ``MambaConfig`` or ``Mamba2Config`` for mamba-ssm's config dict ``raw``."""
    from transformers import Mamba2Config, MambaConfig

    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _refuse(where, f"unknown key(s) {', '.join(unknown)}")
    if raw.get("d_intermediate", 0):
        raise _refuse(where, f"d_intermediate: {raw['d_intermediate']} adds an MLP to every block")
    if raw.get("attn_layer_idx"):
        raise _refuse(where, f"attn_layer_idx: {raw['attn_layer_idx']} puts attention layers in the stack")
    if not raw.get("rms_norm", True):
        raise _refuse(where, "rms_norm: false (LayerNorm blocks)")
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise _refuse(f"{where}: ssm_cfg.layer", f"{layer!r} is not Mamba1 or Mamba2")
    defaults = MAMBA2_DEFAULTS if layer == "Mamba2" else MAMBA1_DEFAULTS
    unknown = sorted(set(ssm) - set(defaults))
    if unknown:
        raise _refuse(f"{where}: ssm_cfg", f"unknown {layer} option(s) {', '.join(unknown)}")
    s = defaults | ssm
    d_model = int(raw["d_model"])
    common = {"hidden_size": d_model, "num_hidden_layers": int(raw["n_layer"]),
              "vocab_size": padded_vocab(int(raw["vocab_size"]), int(raw.get("pad_vocab_size_multiple", 8))),
              "state_size": s["d_state"], "expand": s["expand"], "conv_kernel": s["d_conv"],
              "use_bias": s["bias"], "use_conv_bias": s["conv_bias"], "layer_norm_epsilon": NORM_EPS,
              "residual_in_fp32": raw.get("residual_in_fp32", True),
              "tie_word_embeddings": raw.get("tie_embeddings", True), "time_step_min": s["dt_min"],
              "time_step_max": s["dt_max"], "time_step_floor": s["dt_init_floor"]}
    if layer == "Mamba1":
        rank = math.ceil(d_model / 16) if s["dt_rank"] == "auto" else int(s["dt_rank"])
        return MambaConfig(**common, time_step_rank=rank, time_step_scale=s["dt_scale"],
                           time_step_init_scheme=s["dt_init"])
    inner = s["expand"] * d_model
    for key, bad, what in (("d_ssm", s["d_ssm"] not in (None, inner), f"an SSM over {s['d_ssm']} of {inner} "
                                                                         "channels"),
                           ("D_has_hdim", s["D_has_hdim"], "D per channel instead of per head"),
                           ("rmsnorm", not s["rmsnorm"], "no gated output norm"),
                           ("norm_before_gate", s["norm_before_gate"], "the norm before the gate")):
        if bad:
            raise _refuse(f"{where}: ssm_cfg.{key}", f"{s[key]!r} means {what}")
    if inner % s["headdim"]:
        raise CheckpointError(f"{where}: ssm_cfg.headdim: {s['headdim']} does not divide the inner width {inner}")
    return Mamba2Config(**common, num_heads=inner // s["headdim"], head_dim=s["headdim"], n_groups=s["ngroups"],
                        chunk_size=s["chunk_size"], time_step_limit=tuple(s["dt_limit"]))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``model.safetensors`` or ``pytorch_model.bin`` (tensors only, read on the CPU)."""
    for name in WEIGHT_FILES:
        file = path / name
        if file.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: a mamba-ssm checkpoint with no weights (looked for {', '.join(WEIGHT_FILES)})")


def to_transformers_weights(weights: dict[str, torch.Tensor], tied: bool, where: str
                            ) -> dict[str, torch.Tensor]:
    """Rename mamba-ssm's weights to transformers' (``backbone.embedding`` -> ``backbone.embeddings``; blocks,
    mixers and ``norm_f`` share their names). A tied ``lm_head.weight`` is the embedding saved twice: it is dropped
    after checking that it is, since transformers ties it itself."""
    out = {("backbone.embeddings." + k.removeprefix("backbone.embedding.")
            if k.startswith("backbone.embedding.") else k): v for k, v in weights.items()}
    head, table = out.get("lm_head.weight"), out.get("backbone.embeddings.weight")
    if tied and head is not None:
        if table is not None and head.shape == table.shape and torch.equal(head, table):
            del out["lm_head.weight"]
        else:
            raise CheckpointError(f"{where}: tie_embeddings is true but lm_head.weight is not "
                                  "backbone.embedding.weight")
    return out


def convert(path: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(transformers config, transformers-named state dict) of the mamba-ssm checkpoint directory ``path``."""
    path = Path(path)
    where = str(path / "config.json")
    config = to_transformers_config(json.loads((path / "config.json").read_text()), where)
    weights = to_transformers_weights(read_weights(path), config.tie_word_embeddings, str(path))
    return config, weights
