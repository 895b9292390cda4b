"""One trial, top to bottom: load the task, build the model, apply the PEFT combination, train over the rungs,
evaluate, return.

A baseline (``cfg.baseline``) is the same trial with another set of trainable parameters and no PEFT method:
- ``full``: full fine-tuning, the pretrained checkpoint with every parameter trainable;
- ``head``: the pretrained checkpoint frozen, only the task head trains (a linear probe). ``causal_lm`` and
  ``multiple_choice`` have no head, so this is the base model as it is: nothing trains, and ``run_trial`` evaluates
  it untrained;
- ``scratch``: the checkpoint's architecture randomly initialised with the trial seed, everything trainable.
The optimiser puts an unfrozen backbone in its "base" group at ``training.learning_rate`` and the head at
``learning_rate * head_lr_mult``.

No Ray and no MLflow here: progress goes to the ``report`` callable the caller injects (the search hands in
Ray Tune's reporter; tests hand in a list's ``append``).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from space.config import TaskSpec, TrialConfig
from trials.methods import REGISTRY, AppliedMethods, ModelDims, Prepared, apply_methods, count_params
from trials.models import fused
from trials.models.backbone import OnBackbone
from trials.models.loading import load_base_model, quiet_transformers, random_base_model
from trials.report import DEVICE, FINISHED, KERNEL, Report
from trials.tasks.base import Split, TaskData
from trials.tasks.batching import batches
from trials.tasks.registry import evaluate_split, load_task, task_model, train_loss

BASELINES = ("full", "head", "scratch")
# Steps between the host's reads of the loss on a CUDA device (the NaN check and the loss curve): a non-finite loss
# ends the trial at most this many steps after it appears.
SYNC_EVERY = 16


@dataclass
class TrialResult:
    """A trained trial's figures. ``scores`` holds the task type's metrics on validation and test, named as in
    space/metrics.py (``val_accuracy``, ``test_accuracy``; ``val_loss``, ``val_perplexity``, ...)."""

    scores: dict[str, float]
    trainable_params: int
    trainable_pct: float
    method_params: dict[str, int]
    train_seconds: float
    peak_memory_mb: float
    steps_done: int
    status: str = "finished"
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def val_accuracy(self) -> float:
        return self.scores["val_accuracy"]

    @property
    def test_accuracy(self) -> float:
        return self.scores["test_accuracy"]

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("curve")
        out.pop("method_params")
        out.update(out.pop("scores"))
        out.update({f"params_{k}": v for k, v in self.method_params.items()})
        return out


@dataclass
class BuiltTrial:
    model: OnBackbone  # the task type's model (``trials.tasks.types``): ``model.lm`` the base model, ``model.head``
    applied: AppliedMethods
    data: TaskData
    trainable_params: int
    total_params: int


def head_params(dims: ModelDims, num_classes: int) -> int:
    return dims.D * num_classes + num_classes


def expected_trainable(cfg: TrialConfig, dims: ModelDims, num_classes: int) -> int:
    """Closed-form trainable count of a trial (methods plus the task head), known before building it."""
    return sum(count_params(cfg.methods, dims).values()) + head_params(dims, num_classes)


def prepare_methods(cfg: TrialConfig, data: TaskData) -> TrialConfig:
    """``cfg`` with every method that needs a pass over the data first (``Prepared``: SDT's warm-up) resolved.
    A warm-up is a trial of its own on the same data and device; the global RNG state is restored after it, so
    the trial that follows is the same as one given the resolved config outright."""

    def warm_up(warm: TrialConfig, steps: int) -> AppliedMethods:
        with torch.random.fork_rng():
            built = build_trial(warm, data, trial_device())
            run_trial(warm, steps=steps, built=built)
        return built.applied

    methods = dict(cfg.methods)
    for name, method in REGISTRY.items():
        if name in methods and isinstance(method, Prepared):
            methods[name] = method.prepare(cfg.model_copy(update={"methods": methods}), warm_up)
    return cfg.model_copy(update={"methods": methods})


def build_trial(cfg: TrialConfig, data: TaskData | None = None, device: str | torch.device = "cpu") -> BuiltTrial:
    """The trial's model on ``device``: the task type's model around the base model, with the PEFT methods applied
    (or, for a baseline, its own trainable set), its trainable count checked against the closed form."""
    quiet_transformers()
    torch.manual_seed(cfg.seed)  # a scratch baseline's weights, the head's initialisation
    data = data or load_task(cfg.task, cfg.model)
    if data.type != cfg.task.task_type:
        raise ValueError(f"task {data.name!r} holds {data.type} data, but the trial is a {cfg.task.task_type} task")
    baseline = cfg.baseline
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    if baseline is None:
        cfg = prepare_methods(cfg, data)
    if baseline == "scratch":
        lm = random_base_model(cfg.model.checkpoint, cfg.model.scan)
    else:
        lm = load_base_model(cfg.model.checkpoint, cfg.model.scan)
    if data.max_token_id() >= lm.config.vocab_size:
        raise ValueError(f"task {data.name!r} uses token id {data.max_token_id()} but model.checkpoint "
                         f"{cfg.model.checkpoint!r} has vocab_size {lm.config.vocab_size}")
    model = task_model(lm, data.type, data.num_classes, cfg.model.pooling)
    if baseline is None:
        dims = ModelDims.from_model(lm)  # the base model's sizes (additional-scan enlarges the state)
        applied = apply_methods(lm, cfg.methods)  # freezes lm, then adds the methods' tensors
        expected = expected_trainable(cfg, dims, data.num_classes)
    else:  # the config's methods are ignored
        for p in lm.parameters():
            p.requires_grad_(baseline != "head")
        applied = AppliedMethods(configs={})
        head = count_unique(model.head) if model.head is not None else 0
        expected = head if baseline == "head" else count_unique(model)
    model.to(device)
    trainable = count_unique(model, trainable_only=True)
    if trainable != expected:
        what = f"baseline {baseline}" if baseline else "methods and head"
        raise RuntimeError(f"{what}: measured trainable parameters {trainable} != closed form {expected}")
    return BuiltTrial(model, applied, data, trainable, count_unique(model))


def count_unique(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``module``, each tensor once: a tied ``lm_head``/embedding is one tensor, not two."""
    # Module.parameters() already yields a shared tensor once; dedupe on identity anyway, since the comparison
    # publishes the count.
    seen: dict[int, nn.Parameter] = {}
    for p in module.parameters():
        if not trainable_only or p.requires_grad:
            seen.setdefault(id(p), p)
    return sum(p.numel() for p in seen.values())


def make_optimizer(built: BuiltTrial, cfg: TrialConfig) -> torch.optim.Optimizer | None:
    """AdamW over the trial's parameter groups; None when nothing is trainable (a language-model task with no
    method: the base model as it is)."""
    t = cfg.training
    groups = built.applied.param_groups(t.learning_rate, t.weight_decay)
    if built.model.head is not None:  # classification's head; the language-model task types have none
        groups.append({"params": list(built.model.head.parameters()), "lr": t.learning_rate * t.head_lr_mult,
                       "weight_decay": t.weight_decay, "name": "head"})
    # Anything else left trainable (a baseline that unfreezes the backbone) trains at the base rates.
    covered = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in built.model.parameters() if p.requires_grad and id(p) not in covered]
    if rest:
        groups.append({"params": rest, "lr": t.learning_rate, "weight_decay": t.weight_decay, "name": "base"})
    if not any(g["params"] for g in groups):
        return None
    return torch.optim.AdamW(groups, lr=t.learning_rate)


def warmup_cosine(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(round(steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# torch.autocast's compute dtype per training.precision; fp32 runs without autocast.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def forward_precision(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's precision: autocast to bf16/fp16 (parameters stay fp32, only op inputs are cast; the
    selective scan turns autocast off and runs in fp32), or nothing for fp32."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"training.precision: {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   params: list[nn.Parameter], grad_clip: float) -> None:
    """Backward and one optimiser step. With a scaler (fp16) the loss is scaled for backward, the gradients
    are unscaled before clipping, and a step whose gradients overflowed is skipped while the scale shrinks."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def evaluate(model: nn.Module, split: Split, batch_size: int = 128, device: str | torch.device = "cpu",
             precision: str = "fp32") -> float:
    """Accuracy of a classifier on ``split`` (``trials.tasks.registry.evaluate_split`` measures every task type)."""
    task = TaskSpec()  # classification
    data = TaskData("split", 0, split, split, split)
    return evaluate_split(model, split, data, task, eos_id=None, device=device,
                          precision_ctx=lambda: forward_precision(device, precision),
                          batch_size=batch_size)["accuracy"]


def split_scores(model: nn.Module, built: BuiltTrial, cfg: TrialConfig, split: Split, prefix: str,
                 device: torch.device) -> dict[str, float]:
    """The task type's metrics on ``split``, named ``<prefix>_<metric>`` (``val_loss``, ``test_accuracy``)."""
    scores = evaluate_split(model, split, built.data, cfg.task, eos_id=eos_token(built),
                            device=device, precision_ctx=lambda: forward_precision(device, cfg.training.precision))
    return {f"{prefix}_{k}": v for k, v in scores.items()}


def eos_token(built: BuiltTrial) -> int | None:
    eos = getattr(built.model.lm.config, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def trial_device() -> torch.device:
    """Where trials train (and so where SDT's warm-up and ``trials.train`` build them)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    """Where a trial trains, for its record: ``cpu``, or the CUDA device with its name and the GPUs this process was
    given (Ray sets ``CUDA_VISIBLE_DEVICES`` from ``search.gpus_per_trial``; two trials sharing one GPU show the
    same one)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    return f"cuda:{index} {torch.cuda.get_device_name(index)} (CUDA_VISIBLE_DEVICES={visible})"


def reset_peak_memory(device: torch.device) -> None:
    """Start a trial's peak-memory window. A reused Ray worker runs many trials in one process, so the
    process-lifetime peak would report the largest trial so far; on Linux writing 5 to clear_refs resets
    the resident-set high-water mark (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the process-lifetime peak is reported instead


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocations, or the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def run_trial(cfg: TrialConfig, report: Report | None = None, *, steps: int | None = None,
              data: TaskData | None = None, built: BuiltTrial | None = None) -> TrialResult:
    """Train ``cfg`` on its budget's schedule (``steps`` overrides the budget) and evaluate it.

    The learning-rate schedule spans all ``steps``; validation happens at each rung of ``cfg.training.rungs``
    up to ``steps``. ``report`` receives ``val_accuracy`` at every rung but the last, then one last report with
    every metric and ``finished: True``. Whoever drives the trial may stop it between rung reports (the search's
    pruner does), so the rung values are those of a trial on the full schedule.
    """
    device = trial_device()
    reset_peak_memory(device)
    fused.reset()  # this trial's kernel paths (a reused Ray worker ran others before)
    built = built or build_trial(cfg, data, device)
    model, t = built.model, cfg.training
    steps = steps or t.max_steps
    rungs = {r for r in t.rungs if r < steps} | {steps}
    opt = make_optimizer(built, cfg)
    if opt is None:
        return _untrained(cfg, built, report, steps, sorted(rungs), device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, t.warmup_fraction))
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaler = grad_scaler(device, t.precision)
    gen = torch.Generator().manual_seed(cfg.seed)
    it = batches(built.data.train, t.batch_size, gen)
    curve: list[dict[str, float]] = []
    model.train()
    t0 = time.perf_counter()
    train_seconds = 0.0
    val: dict[str, float] = {}
    # The loss curve and the NaN check stay on the device and are read every ``check`` steps (and at each rung), so a
    # CUDA step does not wait for the host; on the CPU, where reading costs nothing, every step is checked.
    check = sync_interval(device)
    loss_sum, loss_n = torch.zeros((), dtype=torch.float64, device=device), 0
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first step whose loss was not finite
    bad_loss = torch.zeros((), device=device)
    for step in range(1, steps + 1):
        batch = tuple(x.to(device) for x in next(it))
        with forward_precision(device, t.precision):
            loss = train_loss(model, batch, cfg.task)
        newly_bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
        first_bad = torch.where(newly_bad, step, first_bad)
        bad_loss = torch.where(newly_bad, loss.detach().float(), bad_loss)
        if (step % check == 0 or step in rungs) and int(first_bad) >= 0:
            raise FloatingPointError(f"loss is {bad_loss.item()} at step {int(first_bad)} (learning rate too high?)")
        optimizer_step(loss, opt, scaler, trainable, t.grad_clip)
        with warnings.catch_warnings():
            # The schedule follows the step count even when fp16's scaler skipped the optimiser step.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            sched.step()
        loss_sum, loss_n = loss_sum + loss.detach().double(), loss_n + 1
        if step in rungs:
            train_seconds += time.perf_counter() - t0
            val = split_scores(model, built, cfg, built.data.val, "val", device)
            point = {"step": step, **val, "train_loss": float(loss_sum) / loss_n}
            curve.append(point)
            loss_sum, loss_n = torch.zeros_like(loss_sum), 0
            if report is not None and step != steps:
                report({**point, "trainable_params": built.trainable_params, FINISHED: False})
            t0 = time.perf_counter()
    return _finish(cfg, built, report, steps, val, curve, train_seconds, device)


def sync_interval(device: torch.device) -> int:
    """Steps between the host's reads of the training loss: every step on the CPU, SYNC_EVERY elsewhere."""
    return 1 if device.type == "cpu" else SYNC_EVERY


def _untrained(cfg: TrialConfig, built: BuiltTrial, report: Report | None, steps: int, rungs: list[int],
               device: torch.device) -> TrialResult:
    """A trial with nothing to train (the base model as it is): measured once, reported at every rung."""
    val = split_scores(built.model, built, cfg, built.data.val, "val", device)
    curve = [{"step": step, **val, "train_loss": math.nan} for step in rungs]
    for point in curve[:-1]:
        if report is not None:
            report({**point, "trainable_params": built.trainable_params, FINISHED: False})
    return _finish(cfg, built, report, steps, val, curve, 0.0, device)


def _finish(cfg: TrialConfig, built: BuiltTrial, report: Report | None, steps: int, val: dict[str, float],
            curve: list[dict[str, float]], train_seconds: float, device: torch.device) -> TrialResult:
    """Test metrics, the result, and the last report (``finished: True``)."""
    model = built.model
    test = split_scores(model, built, cfg, built.data.test, "test", device)
    result = TrialResult(
        scores={**val, **test}, trainable_params=built.trainable_params,
        trainable_pct=100.0 * built.trainable_params / built.total_params,
        method_params=built.applied.num_params(), train_seconds=train_seconds,
        peak_memory_mb=peak_memory_mb(device), steps_done=steps, curve=curve)
    if report is not None:
        kernel = fused.kernel_label()
        report({**result.metrics(), "step": steps, "train_loss": curve[-1]["train_loss"], FINISHED: True,
                DEVICE: device_label(device), **({KERNEL: kernel} if kernel else {})})
    return result
