"""Search PEFT combinations: ``python -m search.run space.yaml [--address ADDR] [--num-trials N]``.

Ray Tune runs the trials (local Ray, or an existing cluster with ``--address``); Optuna's sampler proposes
each combination (multi-objective: the objectives of space.yaml); an ASHA scheduler stops trials whose
validation accuracy lags; every trial is an MLflow run under one parent run per search. Ends by printing the
Pareto front of the finished trials.

Exit codes: 0 done, 2 invalid space.yaml or arguments (nothing started), 1 the search failed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from space.config import SearchSpace, SpaceError, load_space, replay_trial

EXIT_BAD_INPUT = 2


def trainable(params: dict[str, Any], space_json: str) -> None:
    """One Ray Tune trial: rebuild the config from the sampled params and run it, reporting to Tune."""
    from ray import tune

    from trials.run import run_trial

    space = SearchSpace.model_validate_json(space_json)
    run_trial(replay_trial(space, params), report=tune.report)


def make_scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    es = space.search.early_stopping
    rungs = math.ceil(space.training.steps / space.training.eval_every)
    if not es.enabled or rungs <= es.grace_period:
        return FIFOScheduler()
    # ASHA takes one metric: the accuracy objective. Each report (one validation round) is one time unit.
    return ASHAScheduler(time_attr="training_iteration", metric="val_accuracy", mode="max", max_t=rungs,
                         grace_period=es.grace_period, reduction_factor=es.reduction_factor)


def tracking_uri(space: SearchSpace, results_dir: Path) -> str:
    return space.tracking.uri or f"sqlite:///{results_dir / 'mlflow.db'}"


def format_front(front, objectives: list[str]) -> str:
    if front.empty:
        return "(no finished trials)"
    cols = ["trial", "methods", *objectives]
    cols += [c for c in ("test_accuracy", "train_seconds") if c in front and c not in cols]
    table = front[cols].copy()
    for c in ("val_accuracy", "test_accuracy"):
        if c in table:
            table[c] = table[c].map(lambda v: f"{v:.3f}")
    for c in ("trainable_params",):
        if c in table:
            table[c] = table[c].map(lambda v: f"{int(v):,}")
    if "train_seconds" in table:
        table["train_seconds"] = table["train_seconds"].map(lambda v: f"{v:.1f}")
    return table.to_string(index=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", type=Path, help="the search space (space.yaml)")
    p.add_argument("--address", help="an existing Ray cluster to join ('auto' or ray://host:port); "
                                      "overrides search.address")
    p.add_argument("--num-trials", type=int, help="override search.num_trials")
    p.add_argument("--results-dir", type=Path, help="override search.results_dir")
    p.add_argument("--tracking-uri", help="override tracking.uri (MLflow)")
    p.add_argument("--optuna-storage", default=os.environ.get("OPTUNA_STORAGE"),
                   help="override search.optuna_storage, an Optuna RDB URL (default: env OPTUNA_STORAGE)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        space = load_space(args.space)
        overrides: dict[str, Any] = {}
        if args.num_trials is not None:
            if args.num_trials < 1:
                raise SpaceError(f"--num-trials: {args.num_trials} is below 1")
            overrides["num_trials"] = args.num_trials
        if args.address:
            overrides["address"] = args.address
        if args.optuna_storage:
            overrides["optuna_storage"] = args.optuna_storage
        if args.results_dir:
            overrides["results_dir"] = str(args.results_dir)
        if overrides:
            space = space.model_copy(update={"search": space.search.model_copy(update=overrides)})
        if args.tracking_uri:
            space = space.model_copy(update={"tracking": space.tracking.model_copy(update={"uri": args.tracking_uri})})
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    t0 = time.monotonic()

    def echo(line: str = "") -> None:
        elapsed = int(time.monotonic() - t0)
        print(f"{elapsed // 60:02d}:{elapsed % 60:02d} {line}" if line else "", flush=True)

    return search(space, args.space.read_text(), echo=(lambda *a: None) if args.quiet else echo)


def search(space: SearchSpace, space_text: str, echo=print) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from search import results
    from search.searcher import make_searcher
    from search.tracking import MlflowTrialCallback, SearchRun

    results_dir = Path(space.search.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = f"{space.name}-{stamp}"
    uri = tracking_uri(space, results_dir)
    study_name = space.search.study_name or run_name
    storage_url = space.search.optuna_storage or f"sqlite:///{results_dir / 'optuna.db'}"
    objectives = [o.metric for o in space.objectives]

    parent = SearchRun(uri, space.tracking.experiment, results_dir / "mlartifacts", run_name, space, space_text)
    callback = MlflowTrialCallback(parent, space, space.search.num_trials, echo=echo)
    echo(f"search {run_name}: {space.search.num_trials} trials, {space.search.concurrency} at a time, "
         f"objectives {objectives}")
    echo(f"MLflow: {uri} (experiment {space.tracking.experiment!r}, run {parent.run_id}); "
         f"Optuna study {study_name!r} in {storage_url}")

    ray.init(address=space.search.address, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    status = results.STATUS_FAILED
    try:
        searcher = ConcurrencyLimiter(make_searcher(space, study_name, storage_url),
                                      max_concurrent=space.search.concurrency)
        resources = {"cpu": space.search.cpus_per_trial, "gpu": space.search.gpus_per_trial}
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trainable, space_json=space.model_dump_json()), resources),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(space),
                                        num_samples=space.search.num_trials, reuse_actors=True),
            run_config=tune.RunConfig(name=run_name, storage_path=str(results_dir / "ray"), verbose=0,
                                      callbacks=[callback], failure_config=tune.FailureConfig(max_failures=0)),
        )
        tuner.fit()
        status = results.STATUS_FINISHED
    except KeyboardInterrupt:
        status = "interrupted"
        echo("interrupted: finished trials are kept in MLflow")
    finally:
        df = results.trials(parent.client, space.tracking.experiment, parent.run_id)
        front = results.pareto(df, objectives)
        counts = callback.counts()
        parent.finish(status, front.to_csv(index=False) if not front.empty else None, counts)
        ray.shutdown()
    echo("")
    echo(f"{counts.get('finished', 0)} finished, {counts.get('stopped', 0)} stopped early, "
         f"{counts.get('failed', 0)} failed")
    echo("Pareto front (finished trials only):")
    echo(format_front(front, objectives))
    echo("")
    echo("next: `make dashboard` to browse, `python -m search.export -o best.yaml` then "
         "`python -m trials.train best.yaml` to train the most accurate Pareto trial")
    return 0 if status == results.STATUS_FINISHED and counts.get("finished", 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
