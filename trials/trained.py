"""Train one configuration with its full schedule and save it, and load what was saved (``python -m trials.train
best.yaml`` is the command).

Writes to ``--out`` (default ``outputs/<config name>``):
- ``trial_config.yaml``: the config that was trained;
- ``adapter/``: the PEFT tensors and the task head (``adapter.safetensors``) with their spec (``adapter.json``),
  loadable onto a fresh copy of the base model with ``load_trained``;
- ``merged/``: when every method is mergeable, the whole trained model in one directory: a plain Hugging Face
  Mamba checkpoint (``save_pretrained``, with ``id2label`` in its config) with the methods folded into its weights,
  the task head (``head.safetensors``), what a prediction needs to know (``task.json``) and the checkpoint's own
  tokenizer when it has one;
- ``task.json``: the task type, class names, pooling, input limit and base checkpoint (``trials.predict`` reads it);
- ``metrics.json``: the task type's validation and test metrics, parameter counts, time, and the merge check.

``python -m trials.predict OUT texts.txt`` runs the saved model on new inputs. The command (``trials.train``) logs the
training run to MLflow through ``search.training`` (``--register NAME`` puts the model in the registry); ``train``
itself takes a ``TrainingLog`` and knows nothing of MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from space.config import TrialConfig
from trials.methods import REGISTRY, load_adapters, merge_methods, save_adapters
from trials.models.backbone import OnBackbone
from trials.models.loading import EMBEDDED_CHECKPOINTS, embedded_name, load_base_model, quiet_transformers
from trials.run import build_trial, run_trial, trial_device
from trials.tasks.registry import source, task_model
from trials.tasks.tokenizers import HFTokenizer, make_tokenizer

HEAD_FILE = "head.safetensors"
TASK_FILE = "task.json"


class TrainingLog(Protocol):
    """Where a training run is recorded besides the terminal (``search.training.TrainingRun`` logs it to MLflow)."""

    def started(self, cfg: TrialConfig, steps: int) -> None: ...

    def progress(self, point: dict[str, Any]) -> None: ...

    def finished(self, out: Path, metrics: dict[str, Any]) -> None: ...

    def failed(self, error: BaseException) -> None: ...


def _head_state(model: OnBackbone) -> dict[str, torch.Tensor]:
    """The classification head's tensors; a language-model task type has no head."""
    if model.head is None:
        return {}
    return {f"head.{k}": v for k, v in model.head.state_dict().items()}


def _load_head(model: OnBackbone, tensors: dict[str, torch.Tensor]) -> None:
    if model.head is not None:
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})


def _scores(m: dict, prefix: str) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(prefix) and isinstance(v, float))


def class_names(cfg: TrialConfig) -> list[str]:
    """What each class index of a classification task stands for (empty for the language-model task types), as its
    source numbers them."""
    if cfg.task.task_type != "classification":
        return []
    return source(cfg.task.name).class_names(cfg.task)


def task_description(cfg: TrialConfig, labels: list[str]) -> dict[str, Any]:
    """``task.json``: what running the saved model on new inputs needs besides its weights."""
    checkpoint = cfg.model.checkpoint
    if checkpoint == "embedded" or checkpoint in EMBEDDED_CHECKPOINTS:
        checkpoint = embedded_name(checkpoint)  # the one trained on, whatever MAMBA_PEFT_EMBEDDED says later
    src = source(cfg.task.name)
    return {"task_type": cfg.task.task_type, "task": cfg.task.name, "labels": labels, "pooling": cfg.model.pooling,
            # digits reads 64 pixel intensities; every other task reads text through its tokenizer
            "inputs": src.inputs, "max_length": src.input_length(cfg.task),
            "choice_scoring": cfg.task.choice_scoring, "max_new_tokens": cfg.task.max_new_tokens,
            "base_checkpoint": checkpoint, "tokenizer": cfg.model.tokenizer, "scan": cfg.model.scan}


def train(cfg: TrialConfig, out: Path, steps: int | None = None, echo=print, log: TrainingLog | None = None) -> dict:
    steps = steps or cfg.training.max_steps
    built = build_trial(cfg, device=trial_device())  # where run_trial trains it
    labels = class_names(cfg)
    if len(labels) != built.data.num_classes:
        raise RuntimeError(f"task {cfg.task.name!r}: {len(labels)} class names for {built.data.num_classes} classes")
    echo(f"training {cfg.summary()} for {steps} steps ({built.trainable_params:,} trainable parameters)")
    if log is not None:
        log.started(cfg, steps)

    def progress(m: dict) -> None:
        if not m.get("finished"):
            echo(f"step {m['step']:>5}  {_scores(m, 'val_')}  loss {m['train_loss']:.3f}")
        if log is not None:
            log.progress(m)

    try:
        metrics = _train_and_save(cfg, out, steps, built, labels, progress)
    except BaseException as exc:
        if log is not None:
            log.failed(exc)
        raise
    echo(f"{_scores(metrics, 'val_')}  {_scores(metrics, 'test_')}  saved to {out}")
    if log is not None:
        log.finished(out, metrics)
    return metrics


def _train_and_save(cfg: TrialConfig, out: Path, steps: int, built: Any, labels: list[str], progress: Any) -> dict:
    result = run_trial(cfg, report=progress, steps=steps, built=built)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial_config.yaml").write_text(cfg.to_yaml())
    task = json.dumps(task_description(cfg, labels), indent=2) + "\n"
    (out / TASK_FILE).write_text(task)
    model = built.model.cpu()  # saved, merged and compared on the CPU
    model.eval()
    # The applied configs, not cfg.methods: SDT's carries the selection its warm-up made.
    save_adapters(model.lm, built.applied.configs, out / "adapter", extra=_head_state(model))
    metrics = {**result.metrics(), "steps": steps, "curve": result.curve}
    if all(REGISTRY[name].mergeable for name in cfg.methods):
        # Rebuilt from the saved adapter (parametrised modules cannot be deep-copied), which also checks it.
        merged = load_trained(out)
        merge_methods(merged.lm)
        if labels:  # the Hugging Face convention for class names, beside task.json's
            merged.lm.config.id2label = dict(enumerate(labels))
            merged.lm.config.label2id = {name: i for i, name in enumerate(labels)}
        merged.lm.save_pretrained(out / "merged")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _head_state(merged).items()}, str(out / "merged" / HEAD_FILE))
        (out / "merged" / TASK_FILE).write_text(task)
        if source(cfg.task.name).inputs == "text":  # a checkpoint's own tokenizer goes with the model (bytes need none)
            tok = make_tokenizer(cfg.model)
            if isinstance(tok, HFTokenizer):
                tok._tok.save_pretrained(str(out / "merged"))
        metrics["merge_max_rel_error"] = merge_error(model, merged, built.data.val.ids[:64],
                                                     built.data.val.lengths[:64])
    else:
        metrics["merge_max_rel_error"] = None  # some method cannot be folded into the base weights
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def merge_error(adapted: OnBackbone, merged: OnBackbone,
                ids: torch.Tensor,
                lengths: torch.Tensor) -> float:
    a, m = adapted.eval()(ids, lengths), merged.eval()(ids, lengths)
    return float(((a - m).abs().max() / a.abs().max().clamp_min(1e-12)).item())


def read_task(where: Path) -> dict[str, Any]:
    """The ``task.json`` of a saved model directory, or of its parent (an output saved before ``task.json`` existed
    is described from its ``trial_config.yaml``, without class names)."""
    for d in (where, where.parent):
        if (d / TASK_FILE).exists():
            return json.loads((d / TASK_FILE).read_text())
    for d in (where, where.parent):
        if (d / "trial_config.yaml").exists():
            cfg = TrialConfig.from_yaml((d / "trial_config.yaml").read_text(), where=str(d / "trial_config.yaml"))
            return task_description(cfg, [])
    raise FileNotFoundError(f"{where}: no {TASK_FILE} or trial_config.yaml: not a model saved by trials.train")


def load_merged(where: Path) -> OnBackbone:
    """The whole model from one merged directory (``OUT/merged``): backbone, head and task description."""
    from safetensors.torch import load_file

    quiet_transformers()
    task = read_task(where)
    return _assemble(load_base_model(str(where), task["scan"]), load_file(str(where / HEAD_FILE)), task)


def load_trained(out: Path, merged: bool = False) -> OnBackbone:
    """Rebuild a model saved by ``train``: the merged checkpoint, or the base model plus the adapter."""
    if merged:
        return load_merged(out / "merged")
    quiet_transformers()
    task = read_task(out)
    lm = load_base_model(task["base_checkpoint"], task["scan"])
    _, head = load_adapters(lm, out / "adapter")
    return _assemble(lm, head, task)


def _assemble(lm: Any, head: dict[str, torch.Tensor], task: dict[str, Any]) -> OnBackbone:
    num_classes = head["head.weight"].shape[0] if "head.weight" in head else 0
    model = task_model(lm, task["task_type"], num_classes, task["pooling"])
    _load_head(model, head)
    return model.eval()
