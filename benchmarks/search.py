"""Search benchmark: what the search's choices buy, measured side by side in one run.

    python -m benchmarks.search [--tasks digits pydoc_topics] [--seeds 0 1 2] [--trials 24] [--workers 2]

On each built-in task and seed it runs four searches of the same trial count over one space (seven methods,
ranks, learning rate, pooling), each through the project's own ``PeftSearcher`` and pruners, trials trained one
after another in-process (no Ray: its overhead would be measured otherwise):

- ``tpe+pareto``: TPE with the Pareto-aware pruner (the default);
- ``tpe``: TPE without pruning;
- ``random+pareto``: random sampling with the Pareto-aware pruner;
- ``two_stage+pareto``: the two-stage recipe (half the trials each stage) with the pruner.

It prints, per task and seed, every arm's final hypervolume (validation accuracy x log10 trainable parameters),
best validation accuracy and total training steps, then the ratios the README records, last:
- pruning: steps(tpe+pareto) / steps(tpe), and hypervolume(tpe+pareto) / hypervolume(tpe) (target: at most 0.5
  of the steps, hypervolume within 2%);
- sampler: median hypervolume of tpe+pareto against random+pareto (target: TPE at least as high);
- strategy: two_stage+pareto against tpe+pareto, hypervolume and best accuracy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

ARMS = {
    "tpe+pareto": {"sampler": "tpe", "pruner": "pareto", "strategy": "one_stage"},
    "tpe": {"sampler": "tpe", "pruner": "none", "strategy": "one_stage"},
    "random+pareto": {"sampler": "random", "pruner": "pareto", "strategy": "one_stage"},
    "two_stage+pareto": {"sampler": "tpe", "pruner": "pareto", "strategy": "two_stage"},
}

METHODS = {
    "lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2, 4, 8]}, "scale": {"low": 0.1, "high": 2.0,
                                                                                      "log": True}},
    "lora_x_proj": {"enabled": "search", "rank": {"choices": [1, 2, 4]}, "lr_mult": 0.1},
    "a_log_delta": {"enabled": "search"},
    "d_delta": {"enabled": "search"},
    "conv1d_delta": {"enabled": "search"},
    "parallel_adapter": {"enabled": "search", "rank": {"choices": [4, 8, 16]}},
    "additional_scan": {"enabled": "search", "states": {"choices": [1, 2]}},
}


def bench_space(task: str, arm: str, seed: int, trials: int, min_steps: int, max_steps: int,
                pruner_options: dict[str, Any] | None = None) -> Any:
    from space.config import SearchSpace

    settings = ARMS[arm]
    pruner: Any = settings["pruner"]
    if pruner != "none" and pruner_options:
        pruner = {"name": pruner, **pruner_options}
    search: dict[str, Any] = {"num_trials": trials, "seed": seed, "sampler": settings["sampler"],
                              "pruner": pruner, "strategy": settings["strategy"],
                              "reevaluate": {"top": 0}, "concurrency": 1}
    return SearchSpace.model_validate({
        "name": f"bench-{task}-{arm}-{seed}",
        "model": {"checkpoint": "embedded-tiny", "pooling": {"choices": ["last", "mean"]}},
        "task": {"name": task},
        "methods": METHODS,
        "training": {"budget": {"min_steps": min_steps, "max_steps": max_steps, "reduction_factor": 2},
                     "batch_size": 16, "learning_rate": {"low": 1e-3, "high": 2e-2, "log": True}},
        "search": search,
    })


class _Pruned(Exception):
    pass


class _Silent:
    def settled(self, *args: Any) -> None:
        pass

    def hypervolume(self, completed: int, value: float) -> None:
        pass


def run_search(task: str, arm: str, seed: int, trials: int, min_steps: int, max_steps: int,
               pruner_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One search, its trials trained in this process one after another; returns its figures."""
    import optuna
    import torch
    from ray.tune.search import Searcher

    from search.pruners import SIZE_ATTR, rung_values
    from search.searcher import STATE_ATTR, PeftSearcher
    from space.config import TrialConfig
    from trials.probe import Probe
    from trials.run import run_trial

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = bench_space(task, arm, seed, trials, min_steps, max_steps, pruner_options)
    probe = Probe(space.model, space.task)
    searcher = PeftSearcher(space, optuna.storages.InMemoryStorage(), space.name, probe, None, probe.base_params,
                            _Silent(), echo=lambda line: None)
    t0 = time.perf_counter()
    steps = 0
    for i in range(10 * trials):
        tid = f"t{i}"
        config = searcher.suggest(tid)
        if config == Searcher.FINISHED:
            break
        assert isinstance(config, dict), "one trial at a time: the searcher never has to wait"
        last: dict[str, Any] = {}

        def report(result: dict[str, Any], tid: str = tid, last: dict[str, Any] = last) -> None:
            last.clear()
            last.update(result)
            if searcher.rung(tid, result):
                raise _Pruned

        try:
            run_trial(TrialConfig.model_validate_json(config["trial"]), report, data=probe.data)
        except _Pruned:
            pass
        steps += int(last["step"])
        searcher.on_trial_complete(tid, result=dict(last))
    best = max((r["val_accuracy"] for r in searcher.results), default=0.0)
    counts: dict[str, int] = {}
    for state in searcher.states.values():
        counts[state] = counts.get(state, 0) + 1
    curves = [{"phase": phase.name, "number": t.number, "state": t.user_attrs.get(STATE_ATTR),
               "trainable_params": t.user_attrs.get(SIZE_ATTR), "rungs": rung_values(t),
               "values": t.values, "params": t.params}
              for phase in searcher.phases if phase.study is not None for t in phase.study.get_trials()]
    return {"task": task, "arm": arm, "seed": seed, "hypervolume": searcher.hypervolume(), "best": best,
            "steps": steps, "seconds": time.perf_counter() - t0, "trials": searcher.number, "states": counts,
            "base_params": probe.base_params, "max_steps": max_steps, "curves": curves}


def _run(args: tuple) -> dict[str, Any]:
    return run_search(*args)


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    def per(arm: str, key: str) -> dict[tuple[str, int], float]:
        return {(r["task"], r["seed"]): r[key] for r in rows if r["arm"] == arm}

    def median_ratio(a: dict, b: dict) -> float:
        return statistics.median(a[k] / b[k] for k in a if b.get(k))

    return {
        "pruning_steps_ratio (tpe+pareto / tpe)": median_ratio(per("tpe+pareto", "steps"), per("tpe", "steps")),
        "pruning_hypervolume_ratio (tpe+pareto / tpe)": median_ratio(per("tpe+pareto", "hypervolume"),
                                                                    per("tpe", "hypervolume")),
        "sampler_hypervolume_ratio (tpe+pareto / random+pareto)": median_ratio(per("tpe+pareto", "hypervolume"),
                                                                              per("random+pareto", "hypervolume")),
        "strategy_hypervolume_ratio (two_stage / tpe+pareto)": median_ratio(per("two_stage+pareto", "hypervolume"),
                                                                           per("tpe+pareto", "hypervolume")),
        "strategy_best_accuracy_ratio (two_stage / tpe+pareto)": median_ratio(per("two_stage+pareto", "best"),
                                                                             per("tpe+pareto", "best")),
    }


def _line(row: dict[str, Any]) -> str:
    return (f"{row['task']:>12} seed {row['seed']} {row['arm']:>16}: hypervolume {row['hypervolume']:.4f}  "
            f"best {row['best']:.3f}  steps {row['steps']:>6,}  trials {row['trials']}  {row['states']}  "
            f"{row['seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["digits", "pydoc_topics"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--min-steps", type=int, default=30)
    p.add_argument("--max-steps", type=int, default=240)
    p.add_argument("--workers", type=int, default=2, help="searches run side by side, one CPU thread each")
    p.add_argument("--pruner-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a search.pruner setting for the pruned arms, e.g. min_better=1 (repeatable)")
    p.add_argument("--json", type=Path, help="also write every row and the ratios here")
    p.add_argument("--combine", nargs="+", type=Path, help="print the rows and ratios of earlier --json files "
                   "(e.g. one run per task) instead of running")
    a = p.parse_args(argv)
    if a.combine:
        combined = [row for path in a.combine for row in json.loads(path.read_text())["rows"]]
        for row in sorted(combined, key=lambda r: (r["task"], r["seed"], r["arm"])):
            print(_line(row))
        for name, value in ratios(combined).items():
            print(f"{name}: {value:.3f}")
        return 0
    options = {}
    for item in a.pruner_option:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--pruner-option {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)  # 1 -> int, 0.02 -> float, true -> bool
    jobs = [(task, arm, seed, a.trials, a.min_steps, a.max_steps, options) for task in a.tasks for seed in a.seeds
            for arm in a.arms]
    t0 = time.perf_counter()
    print(f"{len(jobs)} searches of {a.trials} trials ({len(a.tasks)} tasks x {len(a.seeds)} seeds x "
          f"{len(a.arms)} arms), budget {a.min_steps}..{a.max_steps} steps, {a.workers} at a time"
          + (f", pruner options {options}" if options else ""), flush=True)
    rows: list[dict[str, Any]] = []
    with multiprocessing.get_context("spawn").Pool(a.workers) as pool:
        for row in pool.imap_unordered(_run, jobs):
            rows.append(row)
            print(_line(row), flush=True)
            if a.json:  # after every search, so an interrupted run keeps what it measured
                a.json.write_text(json.dumps({"rows": rows, "ratios": {}}, indent=2) + "\n")
    print(f"wall time {time.perf_counter() - t0:.0f} s")
    result = ratios(rows) if set(a.arms) == set(ARMS) else {}
    for name, value in result.items():
        print(f"{name}: {value:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "ratios": result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
