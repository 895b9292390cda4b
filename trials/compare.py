"""A PEFT configuration against its baselines, each arm with its own learning rate chosen on validation.

    python -m trials.compare best.yaml [--arms peft full scratch head] [--lrs 1e-3 3e-3] [--seeds 0 1 2]
                                       [--steps N] [--json out.json] [--markdown]

Arms (baselines: ``trials.run``): ``peft``, the config as given; ``full``, full fine-tuning of the pretrained
checkpoint; ``scratch``, the same architecture randomly initialised, everything trainable; ``head``, the frozen
checkpoint with only the task head trained (for causal_lm and multiple_choice, which have no head, the base model
evaluated as it is). Every arm sees the same data, budget (the config's ``training.rungs[-1]``, or ``--steps``),
batch size, warm-up and cosine schedule, and seeds.

For every arm, every learning rate of its grid and every seed, one trial trains. An arm's learning rate is the
grid value with the best mean over seeds of the task type's validation quality metric (``val_accuracy``,
maximised, or ``val_loss``, minimised: ``space.metrics``); test metrics are reported for the chosen rate and never
choose. A rate at which any seed diverged (non-finite loss) is not chosen. An arm with nothing to train is
evaluated once per seed and has no learning rate.

Default grids (``--lrs`` replaces them with one grid for every arm): three rates spanning an order of magnitude.
PEFT and the linear probe train few, freshly initialised (or zero-initialised delta) tensors and take the higher
rates, 1e-3 to 1e-2 (the search's default is 3e-3; the earlier comparison used 5e-3). Updating every weight moves
the whole network, so full fine-tuning and training from scratch take rates a third of that, 3e-4 to 3e-3. A
chosen rate at the edge of its grid is flagged: the best rate may lie outside it. On digits at 480 steps
(docs/compare-digits.txt) full fine-tuning and scratch peak inside their grids at 1e-3; PEFT and the probe peak at
1e-2, and 3e-2 and 1e-1 are worse for both (docs/compare-digits-edges.txt).

On a CPU shared with other work, run it with OMP_NUM_THREADS=1: the embedded model gains nothing from a second
intra-op thread, and two threads contending with another process made a training step 8x slower.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from space.config import TrialConfig
from space.metrics import default_objectives, direction, kind, quality_metric, test_metric
from trials.run import BASELINES, BuiltTrial, build_trial, run_trial, trial_device
from trials.tasks.base import TaskData
from trials.tasks.registry import load_task
from trials.train import config_argument

ARMS = ("peft", *BASELINES)
DEFAULT_ARMS = ("peft", "full", "scratch", "head")
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "peft": (1e-3, 3e-3, 1e-2),
    "head": (1e-3, 3e-3, 1e-2),
    "full": (3e-4, 1e-3, 3e-3),
    "scratch": (3e-4, 1e-3, 3e-3),
}


@dataclass
class Run:
    """One trained trial of an arm: its seed, its scores (empty when it diverged) and what it cost."""

    seed: int
    scores: dict[str, float]
    trainable_params: int
    train_seconds: float
    error: str | None = None
    curve: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Cell:
    """One learning rate of an arm's grid (``lr`` None: the arm has nothing to train) and its runs."""

    lr: float | None
    runs: list[Run]

    def values(self, metric: str) -> list[float]:
        return [r.scores[metric] for r in self.runs if r.error is None]

    @property
    def failed(self) -> bool:
        return any(r.error is not None for r in self.runs)

    def mean_std(self, metric: str) -> tuple[float, float | None]:
        """Mean over the seeds and their sample standard deviation (None with one seed); nan when a seed failed."""
        vals = self.values(metric)
        if self.failed or not vals:
            return math.nan, None
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None


@dataclass
class ArmResult:
    arm: str
    label: str
    trainable_params: int
    total_params: int
    grid: list[Cell]
    chosen_lr: float | None
    trained: bool = True  # False: nothing trainable, evaluated as it is

    @property
    def chosen(self) -> Cell | None:
        """The chosen rate's cell; None when every rate of the grid failed."""
        if not self.trained:
            return self.grid[0]
        return next((c for c in self.grid if c.lr == self.chosen_lr), None)

    @property
    def at_edge(self) -> bool:
        """The chosen rate is the lowest or highest of a grid of more than one: the best may lie outside."""
        lrs = sorted(c.lr for c in self.grid if c.lr is not None)
        return self.chosen_lr is not None and len(lrs) > 1 and self.chosen_lr in (lrs[0], lrs[-1])


@dataclass
class Comparison:
    task: str
    task_type: str
    metric: str  # the validation metric that chooses
    test_metric: str  # its test twin, reported
    steps: int
    seeds: list[int]
    arms: list[ArmResult]
    wall_seconds: float = 0.0

    def to_json(self, cfg: TrialConfig) -> dict[str, Any]:
        out = asdict(self)
        out["direction"] = direction(self.metric)
        out["config"] = cfg.model_dump(mode="json")
        for arm, raw in zip(self.arms, out["arms"], strict=True):
            raw["at_edge"] = arm.at_edge
            for cell, raw_cell in zip(arm.grid, raw["grid"], strict=True):
                for m in (self.metric, self.test_metric):
                    mean, std = cell.mean_std(m)
                    raw_cell[m] = {"mean": mean, "std": std}
        return _finite(out)


def _finite(obj: Any) -> Any:
    """``obj`` with every nan (a diverged rate's mean, an untrained run's train loss) as None: strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def choose_lr(grid: Sequence[Cell], metric: str) -> float | None:
    """The learning rate whose seeds have the best mean ``metric``, a validation metric (test metrics never choose).

    Rates at which a seed failed are skipped; on a tie the first rate listed wins; None when every rate failed.
    """
    if kind(metric) != "rung":
        raise ValueError(f"{metric!r} is not a validation metric; only those choose a learning rate")
    sign = 1.0 if direction(metric) == "max" else -1.0
    best: Cell | None = None
    for cell in grid:
        mean, _ = cell.mean_std(metric)
        if math.isnan(mean):
            continue
        if best is None or sign * mean > sign * best.mean_std(metric)[0]:
            best = cell
    return None if best is None else best.lr


def arm_label(arm: str, cfg: TrialConfig) -> str:
    if arm == "peft":
        return f"PEFT: {cfg.summary()}"
    if arm == "head":
        return "head only" if cfg.task.task_type == "classification" else "base model, untrained"
    return {"full": "full fine-tuning", "scratch": "from scratch"}[arm]


def with_lr_seed(cfg: TrialConfig, lr: float, seed: int) -> TrialConfig:
    return cfg.model_copy(update={"seed": seed, "training": cfg.training.model_copy(update={"learning_rate": lr})})


def _train(cfg: TrialConfig, built: BuiltTrial, steps: int) -> Run:
    try:
        result = run_trial(cfg, steps=steps, built=built)
    except FloatingPointError as exc:  # a rate too high for this arm: recorded, never chosen
        return Run(cfg.seed, {}, built.trainable_params, 0.0, error=str(exc))
    return Run(cfg.seed, result.scores, result.trainable_params, result.train_seconds, curve=result.curve)


def run_arm(arm: str, cfg: TrialConfig, data: TaskData, lrs: Sequence[float], seeds: Sequence[int], steps: int,
            metric: str, echo: Callable[[str], None] = print) -> ArmResult:
    """Train ``arm`` at every rate of ``lrs`` and every seed, and choose its rate on ``metric``."""
    device = trial_device()

    def build(c: TrialConfig) -> BuiltTrial:
        return build_trial(c if arm == "peft" else c.model_copy(update={"baseline": arm}), data, device)

    def train(c: TrialConfig, built: BuiltTrial) -> Run:
        run = _train(c, built, steps)
        shown = run.error or "  ".join(f"{k} {v:.4f}" for k, v in run.scores.items())
        echo(f"{arm:8} lr {fmt_lr(c.training.learning_rate if built.trainable_params else None):>6} "
             f"seed {c.seed}: {shown}  ({run.train_seconds:.0f} s)")
        return run

    label = arm_label(arm, cfg)
    first = build(with_lr_seed(cfg, lrs[0], seeds[0]))
    pending: BuiltTrial | None = first  # built for (lrs[0], seeds[0]); the rest are built as they train
    if first.trainable_params == 0:  # the rate is irrelevant: the untrained model, measured once per seed
        cell = Cell(None, [train(c, first if c.seed == seeds[0] else build(c))
                           for c in (with_lr_seed(cfg, lrs[0], s) for s in seeds)])
        return ArmResult(arm, label, 0, first.total_params, [cell], None, trained=False)
    grid: list[Cell] = []
    for lr in lrs:
        cell = Cell(lr, [])
        for seed in seeds:
            c = with_lr_seed(cfg, lr, seed)
            built, pending = pending or build(c), None
            cell.runs.append(train(c, built))
        grid.append(cell)
    return ArmResult(arm, label, first.trainable_params, first.total_params, grid, choose_lr(grid, metric))


def check_arms(cfg: TrialConfig, arms: Sequence[str]) -> None:
    """Every arm is known, and the ``peft`` arm has a PEFT configuration to train (not a baseline's config)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms {unknown} are not among {', '.join(ARMS)}")
    if "peft" in arms and cfg.baseline is not None:
        rest = " ".join(a for a in arms if a != "peft") or cfg.baseline
        raise ValueError(f"baseline: the config is the {cfg.baseline} baseline, not a PEFT configuration; "
                         f"compare the baselines alone with --arms {rest}")


def compare(cfg: TrialConfig, arms: Sequence[str] = DEFAULT_ARMS, lrs: Mapping[str, Sequence[float]] | None = None,
            seeds: Sequence[int] = (0, 1, 2), steps: int | None = None,
            echo: Callable[[str], None] = print) -> Comparison:
    """Every arm of ``arms`` on ``cfg``'s task and budget, each at its best rate of ``lrs[arm]`` (default
    ``DEFAULT_LRS``), over ``seeds``."""
    check_arms(cfg, arms)
    grids = {**DEFAULT_LRS, **(lrs or {})}
    if not seeds or any(not grids[a] for a in arms):
        raise ValueError("compare needs at least one seed and one learning rate per arm")
    steps = steps or cfg.training.max_steps
    metric = quality_metric(default_objectives(cfg.task.task_type))
    t0 = time.perf_counter()
    data = load_task(cfg.task, cfg.model)
    results = [run_arm(a, cfg, data, grids[a], seeds, steps, metric, echo) for a in arms]
    return Comparison(data.name, cfg.task.task_type, metric, test_metric(metric), steps, list(seeds), results,
                      wall_seconds=time.perf_counter() - t0)


def fmt_lr(lr: float | None) -> str:
    """3e-4, 1e-3, 2.5e-3: short and exact."""
    if lr is None:
        return "-"
    mantissa, exp = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def fmt_mean_std(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "diverged"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def table(comp: Comparison) -> str:
    """The chosen rate of each arm, then the whole grid."""
    m, tm = comp.metric, comp.test_metric
    lines = [f"{comp.task} ({comp.task_type}), {comp.steps} steps, seeds {' '.join(map(str, comp.seeds))}; "
             f"each arm's learning rate chosen on mean {m} ({direction(m)}imised); {tm} reported, never chosen",
             "", f"{'arm':44} {'trainable':>10} {'lr':>6}  {m + ' (mean ± std)':>24}  {tm + ' (mean ± std)':>25}"]
    for a in comp.arms:
        cell = a.chosen
        val = fmt_mean_std(*cell.mean_std(m)) if cell else "every rate diverged"
        test = fmt_mean_std(*cell.mean_std(tm)) if cell else ""
        edge = "  (edge of grid)" if a.at_edge else ""
        lines.append(f"{a.label:44} {a.trainable_params:>10,} {fmt_lr(a.chosen_lr):>6}  {val:>24}  {test:>25}{edge}")
    lines += ["", "grid:", f"{'arm':8} {'lr':>6}  {m:>24}  {tm:>25}"]
    for a in comp.arms:
        for cell in a.grid:
            mark = "  <- chosen" if a.trained and cell.lr == a.chosen_lr else ""
            lines.append(f"{a.arm:8} {fmt_lr(cell.lr):>6}  {fmt_mean_std(*cell.mean_std(m)):>24}  "
                         f"{fmt_mean_std(*cell.mean_std(tm)):>25}{mark}")
    return "\n".join(lines)


def markdown(comp: Comparison) -> str:
    """The README's table: one row per arm at its chosen rate."""
    m, tm = comp.metric, comp.test_metric
    n = f"{len(comp.seeds)} seed" + ("s" if len(comp.seeds) > 1 else "")
    lines = [f"| {comp.task}, {comp.steps} steps | trainable params | chosen lr | {m} (mean ± std, {n}) "
             f"| {tm} (mean ± std, {n}) |", "|---|---:|---:|---:|---:|"]
    for a in comp.arms:
        cell = a.chosen
        val = fmt_mean_std(*cell.mean_std(m)) if cell else "every rate diverged"
        test = fmt_mean_std(*cell.mean_std(tm)) if cell else ""
        lr = fmt_lr(a.chosen_lr) if a.trained else "untrained"
        lines.append(f"| {a.label} | {a.trainable_params:,} | {lr} | {val} | {test} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trials.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="a trial config (e.g. from `python -m search.export`)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS), help="default: %(default)s")
    p.add_argument("--lrs", type=float, nargs="+",
                   help="one learning-rate grid for every arm (default: per arm, " +
                        "; ".join(f"{a} {' '.join(map(fmt_lr, g))}" for a, g in DEFAULT_LRS.items()) + ")")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="default: %(default)s")
    p.add_argument("--steps", type=int, help="default: the config's budget (training.rungs[-1])")
    p.add_argument("--json", type=Path, help="write every run, the grid and the choices to this file")
    p.add_argument("--markdown", action="store_true", help="also print the README table")
    a = p.parse_args(argv)
    cfg = config_argument(a.config, a.steps)
    if cfg is None:
        return 2
    try:
        check_arms(cfg, a.arms)
    except ValueError as exc:
        print(f"error: {a.config}: {exc}", file=sys.stderr)
        return 2
    if a.lrs is not None and any(not lr > 0 for lr in a.lrs):
        print(f"error: --lrs {' '.join(map(str, a.lrs))}: every learning rate must be above 0", file=sys.stderr)
        return 2
    echo = lambda line: print(line, flush=True)  # noqa: E731
    lrs = {arm: a.lrs for arm in ARMS} if a.lrs else None
    comp = compare(cfg, a.arms, lrs, a.seeds, a.steps, echo)
    print("\n" + table(comp))
    if a.markdown:
        print("\n" + markdown(comp))
    print(f"\nwall time {comp.wall_seconds / 60:.1f} min")
    if a.json:
        a.json.write_text(json.dumps(comp.to_json(cfg), indent=2, allow_nan=False) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
