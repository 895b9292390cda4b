"""Search PEFT combinations: ``python -m search.run space.yaml [--dry-run] [--address ADDR] [--num-trials N]``.

Ray Tune runs the trials (local Ray, or an existing cluster with ``--address``); Optuna proposes each combination
(multi-objective: the objectives of space.yaml) and its pruner stops trials at the budget's rungs; every trial
is an MLflow run under one parent run per search. ``search.searcher`` has the phases (one stage or two, then the
re-evaluation of the front). Ends by printing the counts of every trial state, the steps pruning saved, the
hypervolume, and the Pareto front of the trials that trained the full budget, with the spread of the
re-evaluated ones.

``--dry-run`` validates the space, opens the checkpoint's config and the task, and prints the searched
dimensions, the closed-form size range of the configurations and an estimated cost, without starting Ray.

``--resume [SEARCH]`` continues a search that was stopped (Ctrl-C, SIGTERM, or its driver killed): the latest search
of the store, or the one with that id (``python -m search.list``). Ended trials are kept, the ones in flight run
again, and the search stays one MLflow run (``search.resume``, ``PeftSearcher.resume``). Ctrl-C and SIGTERM stop a
search cleanly and print the command that resumes it.

Exit codes: 0 done, 2 invalid space.yaml, arguments, checkpoint or data (nothing started), 1 the search failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from search.faults import failure_report
from space.config import SearchSpace, SpaceError, TrialConfig, dimensions, load_space, with_local_paths
from space.metrics import WORST, size_metric, test_metric
from space.secrets import mask

if TYPE_CHECKING:
    from search.probe_process import ProbeProcess

EXIT_BAD_INPUT = 2
TABLE_WIDTH = 120


def trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: the validated TrialConfig the searcher built, trained with reports to Tune.

    An error of the trial's own becomes its last report rather than a Ray error (``search.faults``): Ray then
    starts a trial again only when the process running it died, which is worth retrying."""
    from ray import tune

    from trials.run import run_trial

    try:
        run_trial(TrialConfig.model_validate_json(config["trial"]), report=tune.report)
    except Exception as exc:  # noqa: BLE001 - every error of the trial's own is recorded, none ends the search
        tune.report(failure_report(exc))


def space_methods(space: SearchSpace) -> dict[str, Any]:
    """The methods a trial of ``space`` may use (on, or searched), with their spaces: each must apply to the
    checkpoint's architecture, with every value it may take (the probe checks both before any trial)."""
    return {name: method for name, method in space.methods.items() if method.enabled is not False}


def worker_niceness() -> None:
    """Trials of the local Ray this driver starts run at the priority of any other process (niceness 0), not Ray's
    default of 15, at which any busy process on the machine (an editor, a build) takes their CPU. A value the
    user set (``RAY_worker_niceness``) is kept; a cluster joined with ``--address`` keeps what it was started with."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def log_ray_tune(path: Path) -> None:
    """Ray Tune's own log (a trial's Ray error with its traceback, restarts) goes to ``path``, not the terminal,
    where the search prints one line per failure or restart itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("ray.tune")
    for handler in [h for h in logger.handlers if getattr(h, "mps_search_log", False)]:
        logger.removeHandler(handler)  # an earlier search of this process
        handler.close()
    handler = logging.FileHandler(path)
    handler.mps_search_log = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """What each Ray trial reserves: ``search.cpus_per_trial`` CPUs and ``search.gpus_per_trial`` GPUs (a fraction
    such as 0.5 packs two trials on one GPU; Ray sets each trial's CUDA_VISIBLE_DEVICES accordingly)."""
    return {"cpu": space.search.cpus_per_trial, "gpu": space.search.gpus_per_trial}


def tracking_uri(space: SearchSpace, results_dir: Path) -> str:
    return space.tracking.uri or f"sqlite:///{results_dir / 'mlflow.db'}"


def abbreviate(summary: str) -> str:
    """``lora_in_proj(r=4) + a_log_delta`` -> ``L-in(r=4)+a_logΔ``: the full config is in MLflow."""
    return (summary.replace(" + ", "+").replace("lora_", "L-").replace("_proj", "").replace("_delta", "Δ")
            .replace("prompt_tuning", "prompt").replace("affix_tuning", "affix").replace("parallel_adapter", "adapter")
            .replace("additional_scan", "add-scan"))


def format_front(front, objectives: list[str], width: int = TABLE_WIDTH) -> str:
    """The front as a table that fits ``width`` columns whatever the number of methods (abbreviated, then cut)."""
    import pandas as pd

    from space.metrics import direction, quality_metric

    if front.empty:
        return "(no trial trained the full budget)"
    quality = quality_metric(objectives)
    mean = f"{quality}_mean"
    if mean in front:  # most accurate first by the mean over seeds, as export chooses
        front = front.sort_values(mean, ascending=direction(quality) == "min", kind="stable")
    table = pd.DataFrame({"trial": front["trial"]})
    if mean in front and (front["seeds"] > 1).any():
        table[quality] = [f"{m:.3f}±{sd:.3f}" if n > 1 else f"{v:.3f}" for m, sd, n, v in zip(
            front[mean], front[f"{quality}_std"], front["seeds"], front[quality], strict=True)]
        table["seeds"] = front["seeds"]
    else:
        table[quality] = front[quality].map(lambda v: f"{v:.3f}")
    for m in objectives:
        if m != quality and m in front:
            integer = m == "trainable_params"
            table[m] = front[m].map(lambda v, integer=integer: f"{int(v):,}" if integer else f"{v:,.2f}")
    test_name = test_metric(quality)
    test = f"{test_name}_mean" if f"{test_name}_mean" in front else test_name
    if test in front:
        table[test_name.replace("accuracy", "acc")] = front[test].map(lambda v: f"{v:.3f}")
    if "noise" in front and front["noise"].astype(bool).any():
        table["note"] = front["noise"]
    others = len(table.to_string(index=False).splitlines()[0])
    room = max(8, width - others - 2)
    table.insert(1, "methods", [s if len(s) <= room else s[: room - 1] + "…"
                                for s in front["methods"].map(abbreviate)])
    return table.to_string(index=False)


def check_address(address: str | None, timeout: float = 5.0) -> str | None:
    """Why a Ray cluster at ``address`` cannot be joined, or None when it answers (or is local / ``auto``).

    ``host:port`` (the cluster's GCS) is tried with one TCP connection, so a wrong address is an error in seconds
    rather than minutes of Ray retrying. A Ray Client address (``ray://``) is refused: through Ray Client, Ray Tune
    runs its loop in an actor on the cluster with copies of the searcher and the MLflow callback, so this driver
    would never see its own trials end (the search would end "interrupted", with no hypervolume)."""
    if address is None or address in ("auto", "local"):
        return None
    if address.startswith("ray://"):
        host = address.removeprefix("ray://").rpartition(":")[0] or "HEAD"
        return (f"search.address {address!r}: Ray Client (ray://) is not supported, since Ray Tune would run the "
                f"search's loop on the cluster, away from this driver. Run the search on a node of the cluster: on "
                f"this machine `ray start --address={host}:6379 --num-cpus=0` (no trials here), then "
                f"--address {host}:6379 (or auto)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"search.address {address!r}: expected host:port (the Ray head's GCS address) or auto"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        return (f"search.address {address!r}: cannot connect to {host}:{port} ({exc.strerror or exc}); is the Ray "
                f"head running there (`ray start --head` prints its address)?")
    return None


def next_commands(uri: str, experiment: str, run_id: str, run_name: str) -> list[str]:
    """The commands that open this search in the dashboard and export and train its best trial, with this
    interpreter, this store and this search's id (a password in the URI is already masked: fill it in)."""
    python = shlex.quote(sys.executable)
    store = f"--tracking-uri {shlex.quote(uri)} --experiment {shlex.quote(experiment)}"
    return ["next:",
            f"  browse:  {python} -m streamlit run dashboard/app.py -- {store}   (search {run_name})",
            f"  export:  {python} -m search.export {store} --search {run_id} -o best.yaml",
            f"  train:   {python} -m trials.train best.yaml"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", type=Path, help="the search space (space.yaml)")
    p.add_argument("--dry-run", action="store_true", help="validate, print dimensions, sizes and cost; start nothing")
    p.add_argument("--address", help="an existing Ray cluster to join ('auto' or the head's host:port); "
                                      "overrides search.address")
    p.add_argument("--num-trials", type=int, help="override search.num_trials")
    p.add_argument("--results-dir", type=Path, help="override search.results_dir")
    p.add_argument("--tracking-uri", help="override tracking.uri (MLflow)")
    p.add_argument("--optuna-storage", default=os.environ.get("OPTUNA_STORAGE"),
                   help="override search.optuna_storage, an Optuna RDB URL (default: env OPTUNA_STORAGE)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    p.add_argument("--resume", nargs="?", const="", metavar="SEARCH",
                   help="continue a stopped search: the latest in the store, or the search with this id "
                        "(python -m search.list); give the same space.yaml and options")
    return p.parse_args(argv)


def resume_command(args: argparse.Namespace, search_id: str) -> str:
    """The command that resumes this search: this interpreter, the same space file and options."""
    words = [sys.executable, "-m", "search.run", str(args.space)]
    for option in ("address", "num_trials", "results_dir", "tracking_uri", "optuna_storage"):
        value = getattr(args, option)
        if value is not None and not (option == "optuna_storage" and value == os.environ.get("OPTUNA_STORAGE")):
            words += [f"--{option.replace('_', '-')}", mask(str(value))]
    words += ["--quiet"] if args.quiet else []
    return shlex.join([*words, "--resume", search_id])


def with_overrides(space: SearchSpace, args: argparse.Namespace) -> SearchSpace:
    """The space with the command line's overrides, validated like the file (an error names the option)."""
    search: dict[str, Any] = {}
    for option, key in (("num_trials", "num_trials"), ("address", "address"), ("optuna_storage", "optuna_storage"),
                        ("results_dir", "results_dir")):
        value = getattr(args, option)
        if value is not None:
            search[key] = str(value) if option == "results_dir" else value
    data = space.model_dump(exclude_unset=True)
    data["search"] = {**data.get("search", {}), **search}
    if args.tracking_uri:
        data["tracking"] = {**data.get("tracking", {}), "uri": args.tracking_uri}
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][-1]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if key in search or (key == "uri" and args.tracking_uri):
            raise SpaceError(f"--{key.replace('_', '-')}: {msg} (got {err.get('input')!r})") from None
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in search.items())
        raise SpaceError(f"{args.space} with {given or 'the command-line options'}: "
                         f"{'.'.join(map(str, err['loc']))}: {msg}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Relative paths name files where the command runs; trials run in their own directories (Ray Tune's).
        space = with_local_paths(with_overrides(load_space(args.space), args), Path.cwd())
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    t0 = time.monotonic()

    def echo(line: str = "") -> None:
        elapsed = int(time.monotonic() - t0)
        print(f"{elapsed // 60:02d}:{elapsed % 60:02d} {line}" if line else "", flush=True)

    if not dimensions(space):
        if space.search.num_trials > 1:
            echo(f"nothing is searched in {args.space}: its one configuration is trained once, not "
                 f"{space.search.num_trials} times")
        data = space.model_dump(exclude_unset=True)
        data["search"] = {**data.get("search", {}), "num_trials": 1, "strategy": "one_stage", "stage1_trials": None,
                          "reevaluate": {"top": 0}}
        space = SearchSpace.model_validate(data)
    if args.dry_run:
        return dry_run(space, print)
    with sigterm_as_sigint():
        return search(space, args.space.read_text(), echo=(lambda *a: None) if args.quiet else echo,
                      resume=args.resume, resume_hint=lambda search_id: resume_command(args, search_id),
                      notice=echo)


@contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """SIGTERM stops the search as Ctrl-C does (Ray Tune's graceful stop while it runs, else KeyboardInterrupt), so
    that the runs are marked and the resume command printed rather than the driver dying mid-write."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def trainable_limit(space: SearchSpace, base_params: int) -> int | None:
    limit = space.search.max_trainable
    if isinstance(limit, str):
        return int(base_params * float(limit.rstrip("%")) / 100)
    return limit


def dry_run(space: SearchSpace, echo=print, samples: int = 256) -> int:
    """Validate, open the checkpoint's config and the task, print dimensions, sizes and cost; no Ray."""
    import optuna

    from space.config import sample_trial
    from trials.probe import Probe

    try:
        probe = Probe(space.model, space.task, space_methods(space))
    except (OSError, ValueError) as exc:
        echo(f"error: {exc}")
        return EXIT_BAD_INPUT
    dims = dimensions(space)
    kind = space.task.task_type
    head = "head included" if kind == "classification" else "no task head"
    classes = f", {probe.num_classes} classes" if kind == "classification" else ""
    echo(f"space {space.name!r} is valid: model {space.model.checkpoint} ({probe.base_params:,} parameters), "
         f"task {space.task.name} ({kind}{classes})")
    for note in probe.data.notes:
        echo(f"note: {note}")
    echo(f"budget: rungs {space.training.budget.steps()} steps; pruner {space.search.pruner.name}; "
         f"sampler {space.search.sampler}; strategy {space.search.strategy}")
    echo(f"{len(dims)} searched dimension(s) (the names search.enqueue takes):")
    for name, value in dims.items():
        echo(f"  {name}: {value.model_dump()}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=space.search.seed))
    configs = [sample_trial(space, study.ask()) for _ in range(samples if dims else 1)]
    sizes = sorted(probe.trainable(c) for c in configs)
    pct = 100.0 / probe.base_params
    echo(f"trainable parameters (closed form, {head}, over {len(configs)} sampled configurations): "
         f"{sizes[0]:,} ({sizes[0] * pct:.2f}%) to {sizes[-1]:,} ({sizes[-1] * pct:.2f}%) of the base model")
    limit = trainable_limit(space, probe.base_params)
    if limit is not None:
        over = sum(s > limit for s in sizes)
        echo(f"search.max_trainable {limit:,}: {over} of {len(sizes)} sampled configurations would be rejected")
    middle = sorted(configs, key=probe.trainable)[len(configs) // 2]  # the configuration of median size
    step = probe.step_seconds(middle, threads=max(1, int(space.search.cpus_per_trial)))
    s = space.search
    runs = s.num_trials + s.reevaluate.top * s.reevaluate.seeds + len(s.baselines)
    hours = runs * space.training.budget.max_steps * step / max(1, s.concurrency) / 3600
    echo(f"a training step takes {step * 1000:.0f} ms here on {max(1, int(s.cpus_per_trial))} CPU thread(s) "
         f"({middle.summary()}); {s.num_trials} trials + "
         f"{s.reevaluate.top * s.reevaluate.seeds} re-evaluations + {len(s.baselines)} baselines at "
         f"{space.training.budget.max_steps} steps, "
         f"{s.concurrency} at a time: at most {hours * 60:.1f} min of training (pruning stops many trials early)")
    return 0


def search(space: SearchSpace, space_text: str, echo=print, resume: str | None = None,
           resume_hint: Callable[[str], str] | None = None, notice: Callable[[str], None] | None = None) -> int:
    """Run (or, with ``resume`` an id or "" for the latest, continue) a search; the exit code.

    ``notice`` prints what must reach the terminal even with ``--quiet`` (errors, how to resume)."""
    from search.probe_process import ProbeProcess

    notice = notice or echo
    unreachable = check_address(space.search.address)
    if unreachable is not None:  # ray.init would retry for minutes, printing connection warnings
        notice(f"error: {unreachable}")
        return EXIT_BAD_INPUT
    # Then first of all: the probe opens the model and the task in its own process while this one imports Ray and
    # starts it (seconds of every search's start-up, spent side by side).
    log = Path(space.search.results_dir).resolve() / "ray" / "probe.log"  # beside Ray Tune's log, not the terminal
    with ProbeProcess(space.model, space.task, space_methods(space), log=log) as probe:
        return _search(space, space_text, probe, echo, resume, resume_hint, notice)


def _search(space: SearchSpace, space_text: str, probe: ProbeProcess, echo: Callable[[str], None], resume: str | None,
            resume_hint: Callable[[str], str] | None, notice: Callable[[str], None]) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Ray's experiment state every 2 s rather than every 10 or more: a killed driver's last trials are in it.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune's newer console output prints its own banner (the experiment's configuration box, where results are)
    # even at verbose=0; the older reporter honours verbose=0, and the search prints its own lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import optuna
    import ray
    from ray import tune

    from search import results
    from search import resume as resuming
    from search.hypervolume import size_reference
    from search.searcher import PeftSearcher, RungScheduler
    from search.tracking import MlflowTrialCallback, SearchRun, open_store, settled

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results_dir = Path(space.search.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(space, results_dir)
    run_name = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    prior: dict[str, Any] | None = None
    if resume is not None:
        try:
            c = results.client(uri)
            prior = resuming.find(c, space.tracking.experiment, resume or None, space, results_dir / "ray")
        except (results.ResultsError, resuming.ResumeError) as exc:
            notice(f"error: {exc}")
            return EXIT_BAD_INPUT
        run_name = str(prior["name"])
    local_ray = resuming.LocalRay(results_dir / "ray" / f"{run_name}.pids")
    if prior is not None:
        ended = local_ray.end_leftovers()
        if ended:
            echo(f"ended {len(ended)} process(es) the stopped search's Ray left behind: {', '.join(ended)}")
    study_name = space.search.study_name or run_name
    storage_url = space.search.optuna_storage or f"sqlite:///{results_dir / 'optuna.db'}"
    objectives = space.objective_names

    # The MLflow store is opened (imported, its schema created) while Ray starts and the probe opens the model:
    # seconds of every search's start-up, spent side by side. No run is created before the probe passes.
    pool = ThreadPoolExecutor(1, thread_name_prefix="mps-store")
    opening = pool.submit(open_store, uri, space.tracking.experiment, results_dir / "mlartifacts")
    pool.shutdown(wait=False)  # its one task still runs; the thread ends after it
    if space.search.address is None:
        worker_niceness()
    ray.init(address=space.search.address, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, logging_level=logging.ERROR,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    local_ray.record()  # at once: a driver killed from here on leaves these for --resume to end
    log_ray_tune(results_dir / "ray" / f"{run_name}.log")

    try:
        info = probe.info()
    except Exception as exc:  # noqa: BLE001 - the checkpoint, the task or a method cannot be opened: nothing started
        notice(f"error: {exc}")
        ray.shutdown()
        local_ray.forget()
        opening.exception()  # wait for it; the probe's error is the one to report
        return EXIT_BAD_INPUT
    local_ray.record()  # Ray's agents are up by now
    base_params = int(info["base_params"])
    limit = trainable_limit(space, base_params)
    for note in info["notes"]:
        echo(f"note: {note}")

    s = space.search
    parent = SearchRun(uri, space.tracking.experiment, results_dir / "mlartifacts", run_name, space, space_text,
                       resume_id=None if prior is None else str(prior["run_id"]), store=opening.result())
    # From here every way out ends the search run (and its trial runs) with a clear state.
    status = results.STATUS_FAILED
    searcher: PeftSearcher | None = None
    callback = MlflowTrialCallback(parent, space, echo=echo, base_params=base_params)
    stopped: list[str] = []
    try:
        storage = settled(lambda: optuna.storages.RDBStorage(storage_url))  # two searches may create its schema
        searcher = PeftSearcher(space, storage, study_name, probe, limit, base_params, callback, echo=echo)
        callback.searcher = searcher
        stages = f"two stages ({s.stage1} + {s.num_trials - s.stage1} trials)" if s.strategy == "two_stage" else (
            f"{s.num_trials} trials")
        echo(f"search {run_name}: {stages}, {s.concurrency} at a time, objectives {objectives}; rungs "
             f"{space.training.budget.steps()} steps, pruner {s.pruner.name}, sampler {s.sampler}")
        echo(f"model {space.model.checkpoint}: {base_params:,} parameters"
             + (f"; configurations above {limit:,} trainable parameters are rejected" if limit is not None else ""))
        echo(f"MLflow: {mask(uri)} (experiment {space.tracking.experiment!r}, run {parent.run_id}); "
             f"Optuna study {study_name!r} in {mask(storage_url)}")
        experiment = run_name
        reruns = 0
        if prior is not None:
            marked = resuming.mark_interrupted(parent.client, parent.run_id, space.tracking.experiment)
            kept = resuming.records(parent.client, parent.run_id, space.tracking.experiment)
            reruns = len(searcher.resume(kept, parent.seconds_before))
            segments = len(list((results_dir / "ray").glob(f"{run_name}-resume-*")))
            experiment = f"{run_name}-resume-{segments + 1}"
            echo(f"resuming search {run_name} after {parent.seconds_before:.0f} s: {len(kept)} trial run(s) kept "
                 f"({marked} left running by a stopped driver, now interrupted); {reruns} interrupted trial(s) run "
                 f"again first")
        tuner = tune.Tuner(
            tune.with_resources(trainable, trial_resources(space)),
            # Ray trials are at most the proposals plus the re-evaluations; one more sample lets Ray ask the
            # searcher once more, so that it says it is done rather than Ray stopping at its count.
            tune_config=tune.TuneConfig(search_alg=tune.search.ConcurrencyLimiter(searcher, s.concurrency),
                                        scheduler=RungScheduler(searcher), reuse_actors=True,
                                        num_samples=s.num_trials + s.reevaluate.top * s.reevaluate.seeds
                                        + len(s.baselines) + reruns + 1),
            run_config=tune.RunConfig(name=experiment, storage_path=str(results_dir / "ray"), verbose=0,
                                      callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=s.max_restarts)),
        )
        tuner.fit()
        # Ray catches Ctrl-C (and SIGTERM, passed on as SIGINT) itself and returns from fit(): a search whose
        # searcher never said it was done was stopped, and what still ran is interrupted.
        status = results.STATUS_FINISHED if searcher.exhausted() else results.STATUS_INTERRUPTED
    except KeyboardInterrupt:
        status = results.STATUS_INTERRUPTED
    finally:
        if searcher is not None:
            unstarted = {tid: live for tid, live in searcher.live.items() if tid not in callback.run_ids}
            stopped = searcher.interrupt()
            for tid, live in unstarted.items():  # proposed to Ray, which had not started them: interrupted runs too
                slot = {"mps.slot": str(live.slot)} if live.slot is not None else {}
                callback.settled(live.number, live.phase, live.cfg, dict(live.ot.params) if live.ot else {},
                                 results.STATUS_INTERRUPTED, {}, "not started when the search stopped; run again on "
                                 "resume", tags={"mps.ray_trial_id": tid, **slot})
        callback.mark_interrupted(stopped)
        df = results.trials(parent.client, space.tracking.experiment, parent.run_id)
        front = results.reevaluated(df, results.pareto(df, objectives), objectives)
        counts, rerun = resuming.trial_counts(df)
        hv = searcher.hypervolume() if searcher is not None else 0.0
        summary: dict[str, float] = {f"trials_{k}": v for k, v in counts.items()}
        if searcher is not None:
            summary.update(hypervolume=hv, steps_saved_by_pruning=searcher.steps_saved)
        parent.finish(status, front.to_csv(index=False) if not front.empty else None, summary)
        ray.shutdown()
        local_ray.forget()
        if status == results.STATUS_INTERRUPTED:
            notice(f"interrupted: {len(stopped)} running trial(s) marked interrupted; ended trials are kept")
            if resume_hint is not None:
                notice(f"resume with: {resume_hint(parent.run_id)}")
    assert searcher is not None  # an error in building it has left through the finally above
    echo("")
    echo(", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("finished", "pruned", "failed"))
         + (f" ({rerun} interrupted run(s) trained again)" if rerun else ""))
    if searcher.stop_reason:
        echo(searcher.stop_reason)
    saved, trained = searcher.steps_saved, searcher.steps_trained
    if saved:
        echo(f"pruning saved {saved:,} of the {trained + saved:,} training steps the trials would have taken "
             f"without it ({100 * saved / max(1, trained + saved):.0f}%)")
    size = size_metric(objectives)
    worst = WORST.get(space.quality, "the worst finished value")
    reference = (f" x log10({size}); reference: {space.quality} {worst} and full fine-tuning "
                 f"(log10 {10 ** size_reference(size, base_params):,.0f})") if size else ""
    echo(f"hypervolume {hv:.4f} ({space.quality}{reference})")
    echo("Pareto front (trials that trained the full budget; \u00b1 is the spread over re-evaluation seeds):")
    for line in format_front(front, objectives).splitlines():
        echo(line)
    refs = results.baselines(df)
    if not refs.empty:
        from space.config import baseline_trial

        echo("baselines (references, not candidates of the front):")
        test = test_metric(space.quality)
        trials = {b.name: baseline_trial(space, b) for b in space.search.baselines}
        rates = {trials[b.name].summary(): (trials[b.name].training.learning_rate, b.learning_rate is not None)
                 for b in space.search.baselines}
        for _, row in refs.iterrows():
            lr, own = rates.get(str(row.get("methods", "")), (float("nan"), True))
            echo(f"  {row.get('methods', ''):<28} {space.quality} {float(row.get(space.quality, float('nan'))):.3f}  "
                 f"{test} {float(row.get(test, float('nan'))):.3f}  "
                 f"trainable_params {int(row.get('trainable_params', 0)):,}  learning rate {lr:.2g}"
                 + ("" if own else " (the space's middle, not tuned for it: set search.baselines[].learning_rate, "
                                   "or compare with python -m trials.compare)"))
    echo("")
    for line in next_commands(mask(uri), space.tracking.experiment, parent.run_id, run_name):
        echo(line)
    return 0 if status == results.STATUS_FINISHED and counts.get("finished", 0) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
