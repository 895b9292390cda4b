"""How well a short training budget ranks PEFT configurations compared with a long one.

    python -m benchmarks.fidelity --tasks digits pydoc_topics --configs 12 --max-steps 960 --seed 0 \\
        [--min-rung 15] [--pooling search|last|mean] [--json fidelity.json]

Why: the search trains every configuration on one schedule of ``training.budget.max_steps`` steps and lets its
pruner stop the weak ones at the rungs ``min_steps``, 2 ``min_steps``, ... That only pays off when the accuracy
at an early rung orders the configurations as the full budget would, and the budget itself is only worth its
cost while more steps still change the order. This measures that order instead of guessing it, so that
``training.budget`` (``min_steps``, the first point where a trial may be pruned, and ``max_steps``) can be
chosen from data.

What: for each built-in task it samples ``--configs`` configurations at random (Optuna's RandomSampler) from a
representative space (six methods, each on or off, their ranks and scales, the learning rate, and the pooling,
which ``--pooling`` may fix instead),
trains each once for ``--max-steps`` M steps under the warm-up-cosine schedule of M steps, with seed 0, and
records the validation accuracy at the budget's geometric rungs min-rung, 2 min-rung, 4 min-rung, ... and M
(``Budget(min_steps=min-rung, max_steps=M).steps()``, the ladder the search itself uses). For every
rung r it prints the Spearman rank correlation between the accuracies at r and at M across the configurations
(with a 90% bootstrap interval over configurations), and the mean and standard deviation of the accuracy at r.

How to read it: a Spearman near 1 at rung r means stopping there would rank configurations as M steps do, so
the steps after r buy accuracy but not information; near 0 means the rung's order is noise and pruning there
discards good configurations at random. The summary line per task names the smallest rung from which the
Spearman stays at or above 0.5, 0.8 and 0.9 up to M (and where it first reaches them, when that is earlier).
The rung accuracies are taken mid-schedule (the learning rate has not yet decayed), which is exactly what the
pruner sees at that rung; a run given its own r-step schedule would end annealed and is not measured here. With
12 to 16 configurations a Spearman of 0.6 is uncertain by about 0.3 either way: read the bootstrap interval, not
the second digit.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

THRESHOLDS = (0.5, 0.8, 0.9)
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"name": "digits", "shots_per_class": 10},
    "pydoc_topics": {"name": "pydoc_topics"},
}
# A representative search: the default space's two methods plus four more kinds (x_proj LoRA, a conv1d delta,
# a parallel adapter, additional scan states), every one searched on or off; the learning rate; the pooling.
METHODS: dict[str, dict[str, Any]] = {
    "lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2, 4, 8]},
                     "scale": {"low": 0.1, "high": 2.0, "log": True}},
    "a_log_delta": {"enabled": "search"},
    "lora_x_proj": {"enabled": "search", "rank": {"choices": [1, 2, 4]}},
    "conv1d_delta": {"enabled": "search"},
    "parallel_adapter": {"enabled": "search", "rank": {"choices": [8, 16, 32]},
                         "scale": {"low": 0.03, "high": 0.3, "log": True}},
    "additional_scan": {"enabled": "search", "states": {"choices": [2, 4, 8]}},
}
LEARNING_RATE = {"low": 1.0e-3, "high": 2.0e-2, "log": True}
POOLINGS = ("search", "last", "mean")  # --pooling: searched per configuration, or fixed
BOOTSTRAP = 2000


@dataclass
class ConfigRun:
    """One sampled configuration: what it was, its accuracy at every rung (by step), and its cost."""

    index: int
    summary: str
    params: dict[str, Any]
    trainable_params: int
    seconds: float
    accuracy: dict[int, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class RungStats:
    step: int
    spearman: float  # with the accuracy at the last rung, across the configurations that finished
    spearman_low: float  # 90% bootstrap interval over configurations
    spearman_high: float
    mean: float
    std: float


@dataclass
class TaskResult:
    task: str
    configs: int
    max_steps: int
    rungs: list[int]
    seconds: float
    stats: list[RungStats]
    # threshold -> smallest rung from which the Spearman stays >= threshold up to M, and where it is first reached
    stays_from: dict[str, int | None]
    first_reached: dict[str, int | None]
    runs: list[ConfigRun]


def geometric_rungs(min_rung: int, max_steps: int) -> list[int]:
    """min_rung, 2 min_rung, 4 min_rung, ... below max_steps, then max_steps: the search's own ladder."""
    from space.config import Budget

    if min_rung < 1 or min_rung > max_steps:
        raise ValueError(f"--min-rung {min_rung} must be between 1 and --max-steps {max_steps}")
    return Budget(min_steps=min_rung, max_steps=max_steps, reduction_factor=2).steps()


def benchmark_space(task: str, max_steps: int, min_rung: int, pooling: str = "search") -> Any:
    from space.config import SearchSpace

    return SearchSpace.model_validate({
        "name": f"fidelity-{task}",
        "model": {"checkpoint": "embedded-tiny",  # the model docs/fidelity.md was measured on
                  "pooling": {"choices": ["last", "mean"]} if pooling == "search" else pooling},
        "task": TASKS[task],
        "methods": METHODS,
        "training": {"budget": {"min_steps": min_rung, "max_steps": max_steps, "reduction_factor": 2},
                     "batch_size": 16, "learning_rate": LEARNING_RATE, "weight_decay": 1.0e-4,
                     "warmup_fraction": 0.1},
    })


def sample_configs(space: Any, n: int, seed: int) -> list[tuple[Any, dict[str, Any]]]:
    """n TrialConfigs (with their sampled parameters) from an in-memory study's RandomSampler, each with seed 0:
    the configurations differ, the trial seed does not."""
    import optuna

    from space.config import sample_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((sample_trial(space, trial, seed=0), dict(trial.params)))
    return out


def train_one(index: int, cfg: Any, params: dict[str, Any], data: Any, rungs: list[int]) -> ConfigRun:
    from trials.run import run_trial

    reports: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    run = ConfigRun(index=index, summary=cfg.summary(), params=params, trainable_params=0, seconds=0.0)
    try:
        result = run_trial(cfg, reports.append, data=data)  # validates at cfg.training.rungs
    except FloatingPointError as exc:  # a learning rate that diverges: the search would record a failed trial
        run.error = str(exc)
    else:
        run.trainable_params = result.trainable_params
        wanted = set(rungs)
        run.accuracy = {int(r["step"]): float(r["val_accuracy"]) for r in reports if int(r["step"]) in wanted}
    run.seconds = time.perf_counter() - t0
    return run


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho; NaN when either side is constant (e.g. every configuration still at chance)."""
    from scipy.stats import ConstantInputWarning, spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        rho = float(spearmanr(x, y).statistic)
    return rho


def bootstrap_interval(x: list[float], y: list[float], seed: int) -> tuple[float, float]:
    """5th and 95th percentiles of Spearman over configurations resampled with replacement."""
    rng = random.Random(seed)
    n = len(x)
    values = []
    for _ in range(BOOTSTRAP):
        rows = [rng.randrange(n) for _ in range(n)]
        rho = spearman([x[i] for i in rows], [y[i] for i in rows])
        if not math.isnan(rho):
            values.append(rho)
    if len(values) < BOOTSTRAP // 2:
        return math.nan, math.nan
    values.sort()
    return values[int(0.05 * (len(values) - 1))], values[int(0.95 * (len(values) - 1))]


def rung_stats(runs: list[ConfigRun], rungs: list[int], seed: int) -> list[RungStats]:
    done = [r for r in runs if r.error is None]
    final = [r.accuracy[rungs[-1]] for r in done]
    out = []
    for step in rungs:
        acc = [r.accuracy[step] for r in done]
        rho = spearman(acc, final) if len(done) >= 3 else math.nan
        low, high = bootstrap_interval(acc, final, seed) if len(done) >= 3 else (math.nan, math.nan)
        out.append(RungStats(step=step, spearman=rho, spearman_low=low, spearman_high=high,
                             mean=statistics.fmean(acc) if acc else math.nan,
                             std=statistics.stdev(acc) if len(acc) >= 2 else math.nan))
    return out


def stays_from(stats: list[RungStats], threshold: float) -> int | None:
    """The smallest rung from which every later rung's Spearman is >= threshold (None if not even the last)."""
    best = None
    for s in reversed(stats):
        if not s.spearman >= threshold:  # NaN counts as below
            break
        best = s.step
    return best


def first_reached(stats: list[RungStats], threshold: float) -> int | None:
    return next((s.step for s in stats if s.spearman >= threshold), None)


def run_task(task: str, n: int, max_steps: int, min_rung: int, seed: int, pooling: str = "search") -> TaskResult:
    from trials.tasks.registry import load_task

    rungs = geometric_rungs(min_rung, max_steps)
    space = benchmark_space(task, max_steps, min_rung, pooling)
    data = load_task(space.task, space.model)  # shared by every configuration: pooling does not change the data
    t0 = time.perf_counter()
    runs = []
    for i, (cfg, params) in enumerate(sample_configs(space, n, seed)):
        if cfg.training.rungs != rungs:
            raise RuntimeError(f"sampled config validates at {cfg.training.rungs}, expected the rungs {rungs}")
        run = train_one(i, cfg, params, data, rungs)
        runs.append(run)
        outcome = (f"failed: {run.error}" if run.error else
                   " ".join(f"{r}:{run.accuracy[r]:.3f}" for r in rungs))
        print(f"[{task} {i + 1}/{n}] {run.summary} lr={cfg.training.learning_rate:.2e} "
              f"pool={cfg.model.pooling} | {outcome} | {run.seconds:.1f}s, elapsed {elapsed(t0)}", flush=True)
    stats = rung_stats(runs, rungs, seed)
    key = {t: f"{t:.1f}" for t in THRESHOLDS}
    return TaskResult(task=task, configs=n, max_steps=max_steps, rungs=rungs, seconds=time.perf_counter() - t0,
                      stats=stats, stays_from={key[t]: stays_from(stats, t) for t in THRESHOLDS},
                      first_reached={key[t]: first_reached(stats, t) for t in THRESHOLDS}, runs=runs)


def elapsed(t0: float) -> str:
    s = int(time.perf_counter() - t0)
    return f"{s // 60}:{s % 60:02d}"


def format_task(res: TaskResult) -> str:
    failed = sum(r.error is not None for r in res.runs)
    lines = [f"== {res.task}: {res.configs} configs ({failed} failed), M = {res.max_steps} steps, "
             f"wall {res.seconds / 60:.1f} min ==",
             f"{'rung':>6} {'spearman':>9} {'90% interval':>15} {'mean acc':>9} {'std acc':>8}"]
    for s in res.stats:
        lines.append(f"{s.step:>6} {s.spearman:>9.3f} {f'[{s.spearman_low:.2f}, {s.spearman_high:.2f}]':>15} "
                     f"{s.mean:>9.3f} {s.std:>8.3f}")
    parts = []
    for t in THRESHOLDS:
        k = f"{t:.1f}"
        stay, first = res.stays_from[k], res.first_reached[k]
        text = f">= {k} from rung {stay if stay is not None else 'none'}"
        if first is not None and first != stay:
            text += f" (first at {first})"
        parts.append(text)
    lines.append(f"{res.task}: spearman vs final " + "; ".join(parts))
    return "\n".join(lines)


def to_json(res: TaskResult) -> dict[str, Any]:
    out = asdict(res)
    for run in out["runs"]:
        run["accuracy"] = {str(k): v for k, v in run["accuracy"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--configs", type=int, default=16, help="configurations sampled per task")
    ap.add_argument("--max-steps", type=int, default=960, help="M: every configuration trains this long")
    ap.add_argument("--min-rung", type=int, default=15, help="first rung; later rungs double it up to M")
    ap.add_argument("--seed", type=int, default=0, help="seeds the sampler (each trial itself uses seed 0)")
    ap.add_argument("--pooling", choices=POOLINGS, default="search",
                    help="the classifier's read-out: searched per configuration (default) or fixed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other core free)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every result here")
    args = ap.parse_args(argv)
    if args.configs < 1:
        ap.error(f"--configs {args.configs} is below 1")
    try:
        geometric_rungs(args.min_rung, args.max_steps)
    except ValueError as exc:
        ap.error(str(exc))

    import torch

    torch.set_num_threads(args.threads)
    results = []
    for task in args.tasks:
        res = run_task(task, args.configs, args.max_steps, args.min_rung, args.seed, args.pooling)
        results.append(res)
        print(format_task(res), flush=True)
    if len(results) > 1:
        print()
        for res in results:
            print(format_task(res).splitlines()[-1])
    if args.json:
        meta = {"argv": sys.argv, "threads": args.threads, "seed": args.seed, "pooling": args.pooling}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "tasks": [to_json(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
