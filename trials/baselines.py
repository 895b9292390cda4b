"""Reference trials a PEFT configuration is measured against: the same task, data, head, budget and schedule,
with a different set of trainable parameters.

- ``full``: full fine-tuning. The pretrained checkpoint with every parameter trainable and no PEFT method.
- ``head``: the pretrained checkpoint frozen, only the task head trains (a linear probe). ``causal_lm`` and
  ``multiple_choice`` have no head, so this is the base model as it is: nothing trains, and ``run_trial``
  evaluates it untrained.
- ``scratch``: the checkpoint's architecture randomly initialised with the trial seed, everything trainable.

``build_baseline`` returns a ``BuiltTrial`` that ``run_trial(cfg, built=...)`` trains like any other: the
optimiser puts the unfrozen backbone in its "base" group at ``training.learning_rate`` and the head at
``learning_rate * head_lr_mult``. The config's ``methods`` are ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from space.config import TrialConfig
from trials.data import TaskData
from trials.methods import AppliedMethods
from trials.model import load_base_model, resolve_checkpoint, task_model, use_scan
from trials.run import BuiltTrial, quiet_transformers

BASELINES = ("full", "head", "scratch")


def build_baseline(cfg: TrialConfig, data: TaskData, kind: str, device: str | torch.device = "cpu") -> BuiltTrial:
    """The ``kind`` baseline (one of ``BASELINES``) of ``cfg``'s model and task, on ``device``."""
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r} is not one of {', '.join(BASELINES)}")
    if data.type != cfg.task.task_type:
        raise ValueError(f"task {data.name!r} holds {data.type} data, but the trial is a {cfg.task.task_type} task")
    quiet_transformers()
    torch.manual_seed(cfg.seed)  # the scratch weights and the head's initialisation
    lm = _random_lm(cfg) if kind == "scratch" else load_base_model(cfg.model.checkpoint, cfg.model.scan)
    if data.max_token_id() >= lm.config.vocab_size:
        raise ValueError(f"task {data.name!r} uses token id {data.max_token_id()} but model.checkpoint "
                         f"{cfg.model.checkpoint!r} has vocab_size {lm.config.vocab_size}")
    model = task_model(lm, data.type, data.num_classes, cfg.model.pooling)
    for p in lm.parameters():
        p.requires_grad_(kind != "head")
    model.to(device)
    trainable = count_unique(model, trainable_only=True)
    total = count_unique(model)
    head = count_unique(model.head) if model.head is not None else 0
    expected = head if kind == "head" else total
    if trainable != expected:
        raise RuntimeError(f"baseline {kind}: {trainable} trainable parameters, expected {expected}")
    return BuiltTrial(model, AppliedMethods(configs={}), data, trainable, total)


def count_unique(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module``, each tensor once: a tied ``lm_head``/embedding is one tensor, not two."""
    # Module.parameters() already yields a shared tensor once; dedupe on identity anyway, since the count is
    # what the comparison publishes.
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if not trainable_only or p.requires_grad:
            seen.setdefault(id(p), p)
    return sum(p.numel() for p in seen.values())


def _random_lm(cfg: TrialConfig) -> Any:
    """The checkpoint's architecture (its config only, no weights) with transformers' initialisation."""
    from transformers import MambaConfig, MambaForCausalLM

    path = resolve_checkpoint(cfg.model.checkpoint)
    try:
        config = MambaConfig.from_pretrained(path)
    except OSError as exc:
        raise FileNotFoundError(f"model.checkpoint: cannot load {cfg.model.checkpoint!r} ({path}): {exc}") from exc
    return use_scan(MambaForCausalLM(config), cfg.model.scan)
