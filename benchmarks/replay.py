"""Replay pruners on recorded learning curves: what a pruner would have saved and lost on the same trials.

    python -m benchmarks.replay tpe.json [--grid]

``tpe.json`` is written by ``python -m benchmarks.search --arms tpe --json tpe.json``: searches without pruning,
every trial trained to the full budget with its rung values recorded. A replay walks each search's trials in the
order they ran (one at a time, as the benchmark trains them) and asks a pruner, at every rung, whether it would
have stopped the trial there, judged against the values the earlier trials had recorded at that rung (a trial the
replay prunes records only its rungs up to that point). It reports, per search and as medians over searches:

- steps: training steps with the pruner / without (a pruned trial costs the rung it stopped at);
- hypervolume: of the trials the pruner lets finish / of all trials.

Counterfactual on one sequence of configurations, so the comparison is free of the sampler's reaction to pruning
(in a real search, TPE learns from what finished; ``benchmarks.search`` measures that). It uses the project's own
pruner classes (``search.pruners``) through Optuna's ``BasePruner.prune`` interface, on an in-memory stand-in for
the study. The replay is how the Pareto pruner's defaults were chosen (README, "How the search works").
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial, TrialState

from search.hypervolume import search_hypervolume
from search.pruners import RUNG_ATTR, SIZE_ATTR, make_pruner

QUALITY = "val_accuracy"


class _Study:
    """What a ``search.pruners`` pruner reads of a study: its trials."""

    def __init__(self) -> None:
        self.trials: list[FrozenTrial] = []

    def get_trials(self, deepcopy: bool = True) -> list[FrozenTrial]:
        return self.trials


def _frozen(number: int, size: int, rungs: dict[int, float]) -> FrozenTrial:
    now = datetime.datetime.now()
    distributions: dict[str, BaseDistribution] = {}
    return FrozenTrial(number=number, state=TrialState.RUNNING, value=None, datetime_start=now,
                       datetime_complete=None, params={}, distributions=distributions,
                       user_attrs={RUNG_ATTR: {str(s): v for s, v in rungs.items()}, SIZE_ATTR: size},
                       system_attrs={}, intermediate_values={}, trial_id=number)


def replay(row: dict[str, Any], pruner: BasePruner | None) -> dict[str, float]:
    """Steps and hypervolume of one recorded search replayed with ``pruner`` (None: no pruning)."""
    # Rung values are recorded below the full budget; a trial that passes its last rung trains to ``max_steps``.
    curves = sorted((c for c in row["curves"] if c["state"] == "finished" and c["rungs"]), key=lambda c: c["number"])
    study = _Study()
    steps = 0
    finished: list[dict[str, float]] = []
    pruned = 0
    for curve in curves:
        rungs = sorted((int(s), float(v)) for s, v in curve["rungs"].items())
        seen: dict[int, float] = {}
        frozen = _frozen(curve["number"], curve["trainable_params"], seen)
        study.trials.append(frozen)
        stopped = None
        for step, value in rungs:
            seen[step] = value
            frozen.user_attrs[RUNG_ATTR] = {str(s): v for s, v in seen.items()}
            if pruner is not None and pruner.prune(study, frozen):  # type: ignore[arg-type]
                stopped = step
                break
        if stopped is None:  # finished: later trials see its final values (the Pareto pruner's reach rule uses them)
            steps += row["max_steps"]  # recorded by benchmarks.search (or given with --max-steps)
            finished.append({QUALITY: curve["values"][0], "trainable_params": curve["trainable_params"]})
            frozen.state, frozen.values = TrialState.COMPLETE, curve["values"]
        else:
            steps += stopped
            pruned += 1
            frozen.state = TrialState.PRUNED
    hv = search_hypervolume(finished, QUALITY, "trainable_params", row["base_params"])
    return {"steps": steps, "hypervolume": hv, "pruned": pruned, "trials": len(curves)}


def evaluate(rows: list[dict[str, Any]], name: str, options: dict[str, Any]) -> dict[str, Any]:
    per = []
    for row in rows:
        base = replay(row, None)
        got = replay(row, make_pruner(name, "max", **options))
        per.append({"task": row["task"], "seed": row["seed"], "steps": got["steps"] / base["steps"],
                    "hypervolume": got["hypervolume"] / base["hypervolume"], "pruned": got["pruned"],
                    "trials": got["trials"]})
    return {"pruner": name, "options": options, "per": per,
            "steps": statistics.median(p["steps"] for p in per),
            "hypervolume": statistics.median(p["hypervolume"] for p in per),
            "worst_hypervolume": min(p["hypervolume"] for p in per)}


GRIDS: dict[str, dict[str, list[Any]]] = {
    "pareto": {"min_better": [1, 2], "margin": [0.0, 0.01, 0.02, 0.05], "min_peers": [2, 4]},
    "median": {"min_peers": [2, 4]},
    "successive_halving": {"reduction_factor": [2, 3], "min_peers": [2, 4]},
}


def _line(result: dict[str, Any]) -> str:
    options = " ".join(f"{k}={v}" for k, v in result["options"].items())
    return (f"{result['pruner']:>18} {options:<36} steps {result['steps']:.3f}  hypervolume {result['hypervolume']:.3f}"
            f"  (worst {result['worst_hypervolume']:.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", type=Path, help="benchmarks.search --json files of unpruned searches")
    p.add_argument("--per-search", action="store_true", help="also print each search's ratios")
    p.add_argument("--max-steps", type=int, help="the searches' full budget, for files that do not record it")
    a = p.parse_args(argv)
    rows = [r for path in a.json for r in json.loads(path.read_text())["rows"]
            if r.get("curves") and not any(c["state"] == "pruned" for c in r["curves"])]
    for row in rows:
        if "max_steps" not in row:
            if a.max_steps is None:
                p.error(f"{row['task']} seed {row['seed']}: the file does not record max_steps; give --max-steps")
            row["max_steps"] = a.max_steps
    if not rows:
        p.error("no unpruned search with recorded curves in the given files (run benchmarks.search --arms tpe)")
    print(f"{len(rows)} searches, {sum(len(r['curves']) for r in rows)} trials; ratios are with / without pruning, "
          f"medians over searches (worst hypervolume ratio in brackets)")
    for name, grid in GRIDS.items():
        for combo in itertools.product(*grid.values()):
            result = evaluate(rows, name, dict(zip(grid, combo, strict=True)))
            print(_line(result))
            if a.per_search:
                for q in result["per"]:
                    print(f"    {q['task']} seed {q['seed']}: steps {q['steps']:.3f} hypervolume "
                          f"{q['hypervolume']:.3f} pruned {q['pruned']}/{q['trials']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
