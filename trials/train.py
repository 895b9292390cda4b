"""Train one configuration with its full schedule and save it: ``python -m trials.train best.yaml``.

Writes to ``--out`` (default ``outputs/<config name>``):
- ``trial_config.yaml``: the config that was trained;
- ``adapter/``: the PEFT tensors and the task head (``adapter.safetensors``) with their spec (``adapter.json``),
  loadable onto a fresh copy of the base model with ``load_trained``;
- ``merged/``: when every method is mergeable, a plain Hugging Face Mamba checkpoint (``save_pretrained``)
  with the methods folded into its weights, plus ``head.safetensors``;
- ``metrics.json``: the task type's validation and test metrics, parameter counts, time, and the merge check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from space.config import SpaceError, TrialConfig
from trials.methods import REGISTRY, load_adapters, merge_methods, save_adapters
from trials.model import LanguageModel, SequenceClassifier, load_base_model, task_model
from trials.run import build_trial, quiet_transformers, run_trial, trial_device

HEAD_FILE = "head.safetensors"


def _head_state(model: SequenceClassifier | LanguageModel) -> dict[str, torch.Tensor]:
    """The classification head's tensors; a language-model task type has no head."""
    if model.head is None:
        return {}
    return {f"head.{k}": v for k, v in model.head.state_dict().items()}


def _load_head(model: SequenceClassifier | LanguageModel, tensors: dict[str, torch.Tensor]) -> None:
    if model.head is not None:
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})


def _scores(m: dict, prefix: str) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith(prefix) and isinstance(v, float))


def train(cfg: TrialConfig, out: Path, steps: int | None = None, echo=print) -> dict:
    steps = steps or cfg.training.max_steps
    built = build_trial(cfg, device=trial_device())  # where run_trial trains it
    echo(f"training {cfg.summary()} for {steps} steps ({built.trainable_params:,} trainable parameters)")

    def progress(m: dict) -> None:
        if not m.get("finished"):
            echo(f"step {m['step']:>5}  {_scores(m, 'val_')}  loss {m['train_loss']:.3f}")

    result = run_trial(cfg, report=progress, steps=steps, built=built)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trial_config.yaml").write_text(cfg.to_yaml())
    model = built.model.cpu()  # saved, merged and compared on the CPU
    model.eval()
    # The applied configs, not cfg.methods: SDT's carries the selection its warm-up made.
    save_adapters(model.lm, built.applied.configs, out / "adapter", extra=_head_state(model))
    metrics = {**result.metrics(), "steps": steps, "curve": result.curve}
    if all(REGISTRY[name].mergeable for name in cfg.methods):
        # Rebuilt from the saved adapter (parametrised modules cannot be deep-copied), which also checks it.
        merged = load_trained(out)
        merge_methods(merged.lm)
        merged.lm.save_pretrained(out / "merged")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _head_state(merged).items()}, str(out / "merged" / HEAD_FILE))
        metrics["merge_max_rel_error"] = merge_error(model, merged, built.data.val.ids[:64],
                                                     built.data.val.lengths[:64])
    else:
        metrics["merge_max_rel_error"] = None  # some method cannot be folded into the base weights
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    echo(f"{_scores(result.scores, 'val_')}  {_scores(result.scores, 'test_')}  saved to {out}")
    return metrics


@torch.no_grad()
def merge_error(adapted: SequenceClassifier | LanguageModel, merged: SequenceClassifier | LanguageModel,
                ids: torch.Tensor,
                lengths: torch.Tensor) -> float:
    a, m = adapted.eval()(ids, lengths), merged.eval()(ids, lengths)
    return float(((a - m).abs().max() / a.abs().max().clamp_min(1e-12)).item())


def load_trained(out: Path, merged: bool = False) -> SequenceClassifier | LanguageModel:
    """Rebuild a model saved by ``train``: the merged checkpoint, or the base model plus the adapter."""
    quiet_transformers()
    cfg = TrialConfig.from_yaml((out / "trial_config.yaml").read_text(), where=str(out / "trial_config.yaml"))
    if merged:
        from safetensors.torch import load_file

        lm = load_base_model(str(out / "merged"), cfg.model.scan)
        head = load_file(str(out / "merged" / HEAD_FILE))
    else:
        lm = load_base_model(cfg.model.checkpoint, cfg.model.scan)
        _, extra = load_adapters(lm, out / "adapter")
        head = extra
    num_classes = head["head.weight"].shape[0] if "head.weight" in head else 0
    model = task_model(lm, cfg.task.task_type, num_classes, cfg.model.pooling)
    _load_head(model, head)
    return model.eval()


def config_argument(path: Path, steps: int | None) -> TrialConfig | None:
    """The trial config a command line names, with its ``--steps`` checked; None after printing why not (a missing
    or invalid file, a step count below 1), for the command to exit with 2."""
    if not path.exists():
        print(f"error: {path}: no such file", file=sys.stderr)
        return None
    try:
        cfg = TrialConfig.from_yaml(path.read_text(), where=str(path))
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if steps is not None and steps < 1:
        print(f"error: --steps {steps} is below 1", file=sys.stderr)
        return None
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trials.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="a trial config, e.g. best.yaml from `python -m search.export`")
    p.add_argument("--out", type=Path, help="output directory (default outputs/<config file stem>)")
    p.add_argument("--steps", type=int, help="override the budget (training.rungs[-1], the schedule the search ranked)")
    a = p.parse_args(argv)
    cfg = config_argument(a.config, a.steps)
    if cfg is None:
        return 2
    train(cfg, a.out or Path("outputs") / a.config.stem, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
