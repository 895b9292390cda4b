"""MLflow logging of a search, from the driver only (one writer, so a sqlite store never locks).

The search is a parent run; every Ray Tune trial becomes a child run as soon as it starts, with its sampled
params and config artifact, its validation curve as it reports, and its final metrics and status at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ray.tune import Callback

from search.faults import ERROR_ARTIFACT, FAILED, TRACEBACK, error_reason, error_text
from search.results import CONFIG_ARTIFACT, quiet_store_logs
from space.config import SearchSpace, TrialConfig
from space.metrics import METRICS, kind, test_metric
from space.secrets import mask
from trials.report import DEVICE, FINISHED, KERNEL

# Per-rung metrics are logged as curves; the rest of the final report is logged once.
CURVE_KEYS = (*(m for m in METRICS if kind(m) in ("rung", "size")), "train_loss")
FINAL_KEYS = (*METRICS, "steps_done")
SPACE_ARTIFACT = "space.json"  # the effective space (file plus command-line overrides), masked: what resume compares
SECONDS_TAG = "mps.seconds"  # seconds the search has run over all its sessions, which search.time_budget counts


def effective_space(space: SearchSpace) -> str:
    return mask(json.dumps(space.model_dump(mode="json"), sort_keys=True, indent=1))


# What a database says when another process created the same schema, table or row a moment before.
_CREATED_MEANWHILE = ("already exists", "duplicate key", "uniqueviolation", "duplicatetable")
T = TypeVar("T")


def settled(create: Callable[[], T], attempts: int = 5, wait: float = 1.0) -> T:
    """``create()``, tried again while another process creates the same store schema or experiment at the same
    moment (two searches started at once on a new PostgreSQL database both run its migrations; one of them loses
    with "already exists"). Any other error, or the same one ``attempts`` times, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return create()
        except Exception as exc:
            said = f"{type(exc).__name__} {exc} {exc.__cause__ or ''}".lower()
            if attempt == attempts or not any(s in said for s in _CREATED_MEANWHILE):
                raise
            time.sleep(wait * attempt)
    raise AssertionError("unreachable")


def open_store(tracking_uri: str, experiment: str, artifact_root: Path) -> tuple[Any, str]:
    """An MLflow client of ``tracking_uri`` and the id of ``experiment`` in it, created where missing (a new
    sqlite store's schema included: the slow part, which the driver does while the model is probed)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    quiet_store_logs()
    mlflow.set_tracking_uri(tracking_uri)
    # Opening a new store runs its migrations, which another search may be running at the same moment.
    client = settled(lambda: MlflowClient(tracking_uri=tracking_uri))

    def experiment_id() -> str:
        exp = client.get_experiment_by_name(experiment)  # the first call creates a new store's schema
        if exp is not None:
            return str(exp.experiment_id)
        if tracking_uri.startswith(("http://", "https://")):
            # A tracking server stores (or proxies) artifacts itself, where every client can read them.
            return str(client.create_experiment(experiment))
        artifact_root.mkdir(parents=True, exist_ok=True)
        return str(client.create_experiment(experiment, artifact_location=artifact_root.resolve().as_uri()))

    return client, settled(experiment_id)


class SearchRun:
    """The parent MLflow run of one search: created by a new search, reopened by a resumed one (``resume_id``), so
    that a search is one run from its start to its end however often it was stopped."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path, run_name: str,
                 space: SearchSpace, space_text: str, resume_id: str | None = None,
                 store: tuple[Any, str] | None = None) -> None:
        """``store``: the client and experiment id ``open_store`` returned, when the driver opened them already."""
        self.client, self.experiment_id = store or open_store(tracking_uri, experiment, artifact_root)
        self.started = time.time()  # this session's start: the seconds tag adds the time it has run
        if resume_id is not None:
            run = self.client.get_run(resume_id)
            self.run_id, self.experiment_id = resume_id, run.info.experiment_id
            self.seconds_before = float(run.data.tags.get(SECONDS_TAG, 0.0))
            self.client.update_run(resume_id, status="RUNNING")
            self.client.set_tag(resume_id, "mps.status", "running")
            return
        self.seconds_before = 0.0
        objectives = [o.metric for o in space.objectives]
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mps.kind": "search", "mps.status": "running", "mps.objectives": json.dumps(objectives)})
        self.run_id = run.info.run_id
        s, budget = space.search, space.training.budget
        self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in {
            "num_trials": s.num_trials, "concurrency": s.concurrency, "seed": s.seed, "sampler": s.sampler,
            "pruner": s.pruner.name, "strategy": s.strategy, "rungs": budget.steps(),
            "reevaluate": f"top {s.reevaluate.top}, {s.reevaluate.seeds} seeds", "max_trainable": s.max_trainable,
            "time_budget": s.time_budget, "model": space.model.checkpoint, "task": space.task.name}.items()])
        self.client.log_text(self.run_id, mask(space_text), "space.yaml")  # passwords in URLs never reach MLflow
        self.client.log_text(self.run_id, effective_space(space), SPACE_ARTIFACT)

    def seconds(self) -> float:
        """Seconds the search has run, over every session of it."""
        return self.seconds_before + time.time() - self.started

    def hypervolume(self, completed: int, value: float) -> None:
        self.client.log_batch(self.run_id, metrics=[_metric("hypervolume", value, completed)],
                              tags=[_tag(SECONDS_TAG, f"{self.seconds():.1f}")])

    def finish(self, status: str, pareto_csv: str | None, summary: dict[str, float]) -> None:
        if pareto_csv is not None:
            self.client.log_text(self.run_id, pareto_csv, "pareto.csv")
        self.client.log_batch(self.run_id, metrics=[_metric(k, v) for k, v in summary.items()])
        self.client.set_tag(self.run_id, "mps.status", status)
        self.client.set_tag(self.run_id, SECONDS_TAG, f"{self.seconds():.1f}")
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "KILLED")


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _metric(key: str, value: float, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


class MlflowTrialCallback(Callback):
    """Ray Tune callback: one child MLflow run per trial, plus terse progress lines on the terminal.

    It is also the searcher's ``Recorder``: proposals the searcher settles without Ray (rejected, duplicate) get
    their child run here too, so MLflow holds every trial the Optuna studies hold, in the same words.
    """

    def __init__(self, search: SearchRun, space: SearchSpace, echo=print, base_params: int | None = None) -> None:
        self.search = search
        self.base_params = base_params  # the base model's parameter count, a param of every trial run
        self.space = space
        self.quality = space.quality
        self.echo = echo
        self.searcher: Any = None  # set by the driver: the PeftSearcher whose states this records
        self.run_ids: dict[str, str] = {}
        self.numbers: dict[str, int] = {}
        self.summaries: dict[str, str] = {}
        self.statuses: dict[str, str] = {}
        self.kernel_notes: set[str] = set()  # torch-path reasons already said in the terminal

    def _client(self):
        return self.search.client

    def _label(self, number: int, phase: str) -> str:
        return f"[{phase} {number:>3}]" if phase not in ("search",) else f"[{number:>3}/{self.space.search.num_trials}]"

    def _open(self, number: int, phase: str, cfg: TrialConfig, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self._client().create_run(self.search.experiment_id, run_name=f"trial-{number:03d}", tags={
            "mlflow.parentRunId": self.search.run_id, "mps.kind": "trial", "mps.summary": cfg.summary(),
            "mps.phase": phase, **tags})
        run_id = run.info.run_id
        base = {"base_params": self.base_params} if self.base_params is not None else {}
        self._client().log_batch(run_id, params=[_param(k, v) for k, v in {**params, "seed": cfg.seed, **base}.items()])
        self._client().log_text(run_id, cfg.to_yaml(), CONFIG_ARTIFACT)
        return run_id

    def settled(self, number: int, phase: str, cfg: TrialConfig, params: dict[str, Any], state: str,
                metrics: dict[str, float], note: str, tags: dict[str, str] | None = None) -> None:
        run_id = self._open(number, phase, cfg, params, {"mps.status": state, "mps.note": note, **(tags or {})})
        self._client().log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items() if _finite(v)])
        self._client().set_terminated(run_id, "KILLED" if state == "interrupted" else "FINISHED")
        self.statuses[f"settled-{number}"] = state
        self.echo(f"{self._label(number, phase)} {state:<9} {cfg.summary()}: {note}")

    def hypervolume(self, completed: int, value: float) -> None:
        self.search.hypervolume(completed, value)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.trial_id in self.run_ids:  # a restarted trial keeps its run
            return
        config = trial.config
        cfg = TrialConfig.model_validate_json(config["trial"])
        number, phase = int(config["number"]), str(config["phase"])
        tags = {"mps.status": "running", "mps.ray_trial_id": trial.trial_id,
                "mps.trainable_params": str(config["trainable_params"])}
        if config.get("reevaluates") is not None:
            tags["mps.reevaluates"] = f"trial-{int(config['reevaluates']):03d}"
        if config.get("slot") is not None:  # a baseline or re-evaluation run: its place in the queue, for resume
            tags["mps.slot"] = str(config["slot"])
        self.run_ids[trial.trial_id] = self._open(number, phase, cfg, dict(config["params"]), tags)
        self.numbers[trial.trial_id] = number
        self.summaries[trial.trial_id] = cfg.summary()
        seed = f" (seed {cfg.seed}, re-evaluating {tags['mps.reevaluates']})" if "mps.reevaluates" in tags else ""
        self.echo(f"{self._label(number, phase)} start     {cfg.summary()}{seed}")

    def _phase(self, trial) -> str:
        return str(trial.config.get("phase", "search"))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None or FAILED in result:  # a failure report is recorded when the trial completes
            return
        step = int(result.get("step", result.get("training_iteration", 0)))
        metrics = [_metric(k, result[k], step) for k in CURVE_KEYS if _finite(result.get(k))]
        if result.get(FINISHED):
            metrics += [_metric(k, result[k], step) for k in FINAL_KEYS + tuple(
                k for k in result if k.startswith("params_")) if k not in CURVE_KEYS and _finite(result.get(k))]
        if metrics:
            self._client().log_batch(run_id, metrics=metrics)
        if result.get(FINISHED) and DEVICE in result:
            self._client().set_tag(run_id, "mps.device", str(result[DEVICE]))
        if result.get(FINISHED) and KERNEL in result:
            kernel = str(result[KERNEL])
            self._client().set_tag(run_id, "mps.kernel", kernel[:5000])
            if kernel != "fused" and kernel not in self.kernel_notes:  # the workers' own warnings stay in Ray's logs
                self.kernel_notes.add(kernel)
                label = self._label(self.numbers[trial.trial_id], self._phase(trial))
                self.echo(f"note: {label} ran the torch scan on CUDA, not mamba-ssm's fused kernel "
                          f"({kernel.removeprefix('torch: ')}); later trials with the same reason are tagged "
                          "mps.kernel without this line")
        if not result.get(FINISHED):
            self.echo(f"{self._label(self.numbers[trial.trial_id], self._phase(trial))} step {step:>5} "
                      f"{self.quality} {result.get(self.quality, float('nan')):.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        if FAILED in last:  # the trial's own code raised: its report holds the reason and the traceback
            self._failed(trial, str(last[FAILED]), str(last.get(TRACEBACK, last[FAILED])))
            return
        status = "finished" if last.get(FINISHED) else (
            self.searcher.state_of(trial.trial_id) if self.searcher is not None else "interrupted")
        self._end(trial, status, "FINISHED")
        label = self._label(self.numbers.get(trial.trial_id, 0), self._phase(trial))
        q = last.get(self.quality, float("nan"))
        if status == "finished":
            test = test_metric(self.quality)
            self.echo(f"{label} finished  {self.quality} {q:.3f}  {test} "
                      f"{last.get(test, float('nan')):.3f}  params {int(last.get('trainable_params', 0)):,}"
                      f"  {self.summaries.get(trial.trial_id, '')}")
        else:
            self.echo(f"{label} {status:<9} at step {last.get('step', '?')} ({self.quality} {q:.3f})")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        """Ray's own error for the trial: its process died more often than ``search.max_restarts`` allows."""
        message = error_text(trial)
        self._failed(trial, error_reason(message), message)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        """The process running the trial died (a lost node, a killed worker): Ray starts it again from its start."""
        reason = error_reason(error_text(trial))
        self.echo(f"{self._label(self.numbers.get(trial.trial_id, 0), self._phase(trial))} restarted "
                  f"{self.summaries.get(trial.trial_id, '')}: its worker was lost ({reason}); trained again from the "
                  f"start (restart {trial.run_metadata.num_failures} of {self.space.search.max_restarts})")
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            self._client().set_tag(run_id, "mps.restarts", str(trial.run_metadata.num_failures))

    def _failed(self, trial, reason: str, message: str) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        where = ""
        if run_id is not None:
            self._client().set_tag(run_id, "mps.error", reason[:4000])
            self._client().log_text(run_id, message, ERROR_ARTIFACT)  # the whole traceback, Ray's own included
            where = f" (traceback: {ERROR_ARTIFACT} of MLflow run {run_id})"
        self._end(trial, "failed", "FAILED")
        self.echo(f"{self._label(self.numbers.get(trial.trial_id, 0), self._phase(trial))} failed    {reason}{where}")

    def mark_interrupted(self, trial_ids: list[str]) -> None:
        """Runs of trials Ray stopped without completing them (Ctrl-C): state ``interrupted``, run KILLED."""
        for trial_id in trial_ids:
            run_id = self.run_ids.get(trial_id)
            self.statuses[trial_id] = "interrupted"
            if run_id is not None:
                self._client().set_tag(run_id, "mps.status", "interrupted")
                self._client().set_terminated(run_id, "KILLED")

    def _end(self, trial, status: str, mlflow_status: str) -> None:
        self.statuses[trial.trial_id] = status
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        self._client().set_tag(run_id, "mps.status", status)
        self._client().set_terminated(run_id, mlflow_status)

    def counts(self) -> dict[str, int]:
        from space.metrics import TRIAL_STATES

        out = dict.fromkeys(TRIAL_STATES[1:], 0)
        for s in self.statuses.values():
            out[s] = out.get(s, 0) + 1
        return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

