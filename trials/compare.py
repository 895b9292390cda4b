"""PEFT on the pretrained model against training the same architecture from scratch, on the same budget.

    python -m trials.compare best.yaml [--steps N] [--seeds 0 1 2]

For each seed it trains (a) the trial config's PEFT combination on the pretrained checkpoint and (b) the same
architecture randomly initialised with every parameter trainable (full training from scratch), with the same
data, steps, batch size, learning-rate schedule and head, then prints validation and test accuracy of both.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from space.config import TrialConfig
from trials.data import TaskData
from trials.methods import AppliedMethods
from trials.model import SequenceClassifier, load_base_model, use_scan
from trials.run import BuiltTrial, quiet_transformers, run_trial
from trials.tasks import load_task


def scratch_trial(cfg: TrialConfig, data: TaskData) -> BuiltTrial:
    """The checkpoint's architecture with fresh random weights, everything trainable, no PEFT methods."""
    from transformers import MambaForCausalLM

    quiet_transformers()
    torch.manual_seed(cfg.seed)
    config = load_base_model(cfg.model.checkpoint, cfg.model.scan).config
    lm = use_scan(MambaForCausalLM(config), cfg.model.scan)
    model = SequenceClassifier(lm, data.num_classes, cfg.model.pooling)
    n = sum(p.numel() for p in model.parameters())
    return BuiltTrial(model, AppliedMethods(configs={}), data, trainable_params=n, total_params=n)


def compare(cfg: TrialConfig, steps: int, seeds: list[int]) -> dict[str, list[tuple[float, float]]]:
    data = load_task(cfg.task, cfg.model)
    out: dict[str, list[tuple[float, float]]] = {"peft_pretrained": [], "scratch_full": []}
    for seed in seeds:
        seeded = cfg.model_copy(update={"seed": seed})
        peft = run_trial(seeded, steps=steps, data=data)
        out["peft_pretrained"].append((peft.val_accuracy, peft.test_accuracy))
        scratch = run_trial(seeded, steps=steps, built=scratch_trial(seeded, data))
        out["scratch_full"].append((scratch.val_accuracy, scratch.test_accuracy))
        print(f"seed {seed}: PEFT val {peft.val_accuracy:.3f} test {peft.test_accuracy:.3f} "
              f"({peft.trainable_params:,} params) | scratch val {scratch.val_accuracy:.3f} "
              f"test {scratch.test_accuracy:.3f} ({scratch.trainable_params:,} params)", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trials.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="a trial config (e.g. from `python -m search.export`)")
    p.add_argument("--steps", type=int, help="default: the config's budget (training.rungs[-1])")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    cfg = TrialConfig.from_yaml(a.config.read_text(), where=str(a.config))
    res = compare(cfg, a.steps or cfg.training.max_steps, a.seeds)
    print(f"\n{'':16} {'val (mean)':>11} {'test (mean)':>12}")
    for name, pairs in res.items():
        print(f"{name:16} {statistics.mean(v for v, _ in pairs):11.3f} {statistics.mean(t for _, t in pairs):12.3f}")


if __name__ == "__main__":
    main()
