"""What the search must know about its model and task before any trial trains: the closed-form trainable count of
a configuration, the base model's size, the number of classes, and the time of a training step.

The search driver imports no torch; it runs a ``Probe`` in a child process (``search.probe_process``), and
``python -m search.run --dry-run`` runs one in-process. Opening the checkpoint's config and the task here, once,
also makes a bad checkpoint or data file an error before the first trial starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from space.config import ModelSpec, TaskSpec, TrialConfig
from space.methods import MethodSpace
from trials.methods import ModelDims, config_refusals, supported
from trials.models.loading import load_base_model, quiet_transformers
from trials.run import build_trial, expected_trainable, head_params, make_optimizer, trial_device
from trials.tasks.base import TaskData
from trials.tasks.registry import load_task


class Probe:
    def __init__(self, model: ModelSpec, task: TaskSpec, methods: Iterable[str] | Mapping[str, Any] = ()) -> None:
        """``methods``: the space's methods (names, or the space's ``methods`` mapping of name to method space); one
        the checkpoint's architecture does not support, or a value of one that this model cannot take, is an error
        here, before any trial (``check_methods``)."""
        quiet_transformers()
        # Opened once with its weights, before any trial: another architecture, or a missing or unexpected weight,
        # stops the search here (load_base_model names them).
        lm = load_base_model(model.checkpoint, model.scan)
        self.dims = ModelDims.from_model(lm)
        self.model_type: str = self.dims.model_type  # the architecture the methods are checked against
        self.base_params = sum(p.numel() for p in lm.parameters())  # a tied head is one tensor, counted once
        del lm
        self.check_methods(methods)
        self.data: TaskData = load_task(task, model)
        self.num_classes = self.data.num_classes

    def refusals(self, methods: Iterable[str]) -> dict[str, str]:
        """``{method: reason}`` for each of ``methods`` this checkpoint's architecture does not support (empty when
        all apply)."""
        return {name: reason for name in methods if (reason := supported(name, self.model_type)) is not None}

    def check_methods(self, methods: Iterable[str] | Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming every method of ``methods`` that this checkpoint's architecture does not
        support, with the reason; given the space's method spaces (a mapping), also every method with a value this
        model cannot take (``trials.methods.config_refusals``: a LoRA rank above its block, dropout where it would be
        skipped, ...). Called before any trial starts, so no trial fails on them."""
        names = list(methods)
        refused = {n: f"not supported on {self.model_type} ({r})" for n, r in self.refusals(names).items()}
        if isinstance(methods, Mapping):
            spaces = {n: s for n, s in methods.items() if n not in refused and isinstance(s, MethodSpace)}
            refused.update({n: f"cannot be applied to this {self.model_type} checkpoint: {r}"
                            for n, r in config_refusals(spaces, self.dims).items()})
        if refused:
            raise ValueError("; ".join(f"methods.{name}: {reason}" for name, reason in refused.items()))

    def trainable(self, cfg: TrialConfig) -> int:
        """Closed-form trainable parameters of ``cfg``: its methods plus the task head (a baseline: the head alone, or
        every parameter of the model)."""
        if cfg.baseline == "head":
            return head_params(self.dims, self.num_classes)
        if cfg.baseline is not None:
            return self.base_params + head_params(self.dims, self.num_classes)
        return expected_trainable(cfg, self.dims, self.num_classes)

    def info(self) -> dict[str, Any]:
        """What the driver prints and needs: sizes, and what loading the task changed (rows truncated)."""
        return {"base_params": self.base_params, "num_classes": self.num_classes, "notes": list(self.data.notes),
                "model_type": self.model_type}

    def step_seconds(self, cfg: TrialConfig, warmup: int = 2, steps: int = 5, threads: int | None = None) -> float:
        """Measured seconds of one training step of ``cfg`` (after ``warmup`` steps), for cost estimates; with
        ``threads``, on that many CPU threads, as a Ray trial with that many CPUs runs."""
        from trials.run import forward_precision, optimizer_step
        from trials.tasks.batching import batches
        from trials.tasks.registry import train_loss

        if threads is not None:
            torch.set_num_threads(threads)

        built = build_trial(cfg, self.data, trial_device())
        opt = make_optimizer(built, cfg)
        if opt is None:
            return 0.0  # nothing to train: the trial only evaluates
        params = [p for p in built.model.parameters() if p.requires_grad]
        it = batches(built.data.train, cfg.training.batch_size, torch.Generator().manual_seed(cfg.seed))
        device = trial_device()
        built.model.train()
        t0 = 0.0
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            batch = tuple(x.to(device) for x in next(it))
            with forward_precision(device, cfg.training.precision):
                loss = train_loss(built.model, batch, cfg.task)
            optimizer_step(loss, opt, None, params, cfg.training.grad_clip)
        return (time.perf_counter() - t0) / steps
