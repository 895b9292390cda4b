"""MLflow logging of a search, from the driver only (one writer, so a sqlite store never locks).

The search is a parent run; every Ray Tune trial becomes a child run as soon as it starts, with its sampled
params and config artifact, its validation curve as it reports, and its final metrics and status at the end.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from search.results import (
    CONFIG_ARTIFACT,
    STATUS_FAILED,
    STATUS_FINISHED,
    STATUS_RUNNING,
    STATUS_STOPPED,
)
from space.config import SearchSpace, SpaceError, replay_trial
from trials.run import FINISHED

# Per-step metrics are logged as curves; the rest of the final report is logged once.
CURVE_KEYS = ("val_accuracy", "train_loss", "trainable_params")
FINAL_KEYS = ("val_accuracy", "test_accuracy", "trainable_params", "trainable_pct", "train_seconds",
              "peak_memory_mb", "steps_done")


class SearchRun:
    """The parent MLflow run of one search."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path, run_name: str,
                 space: SearchSpace, space_text: str) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None and tracking_uri.startswith(("http://", "https://")):
            # A tracking server stores (or proxies) artifacts itself, where every client can read them.
            self.experiment_id = self.client.create_experiment(experiment)
        elif exp is None:
            artifact_root.mkdir(parents=True, exist_ok=True)
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=artifact_root.resolve().as_uri())
        else:
            self.experiment_id = exp.experiment_id
        objectives = [o.metric for o in space.objectives]
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            "mps.kind": "search", "mps.status": STATUS_RUNNING, "mps.objectives": json.dumps(objectives)})
        self.run_id = run.info.run_id
        s = space.search
        self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in {
            "num_trials": s.num_trials, "concurrency": s.concurrency, "seed": s.seed, "sampler": s.sampler,
            "early_stopping": s.early_stopping.enabled, "model": space.model.checkpoint, "task": space.task.name,
            "steps": space.training.steps}.items()])
        self.client.log_text(self.run_id, space_text, "space.yaml")

    def finish(self, status: str, pareto_csv: str | None, counts: dict[str, int]) -> None:
        if pareto_csv is not None:
            self.client.log_text(self.run_id, pareto_csv, "pareto.csv")
        self.client.log_batch(self.run_id, metrics=[_metric(f"trials_{k}", v) for k, v in counts.items()])
        self.client.set_tag(self.run_id, "mps.status", status)
        self.client.set_terminated(self.run_id, "FINISHED" if status == STATUS_FINISHED else "KILLED")


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def _metric(key: str, value: float, step: int = 0):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


class MlflowTrialCallback(Callback):
    """Ray Tune callback: one child MLflow run per trial, plus terse progress lines on the terminal."""

    def __init__(self, search: SearchRun, space: SearchSpace, total: int, echo=print) -> None:
        self.search = search
        self.space = space
        self.total = total
        self.echo = echo
        self.run_ids: dict[str, str] = {}
        self.numbers: dict[str, int] = {}
        self.summaries: dict[str, str] = {}
        self.statuses: dict[str, str] = {}

    def _client(self):
        return self.search.client

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.trial_id in self.run_ids:  # a restarted trial keeps its run
            return
        number = len(self.numbers) + 1
        self.numbers[trial.trial_id] = number
        params = dict(trial.config)
        try:
            cfg = replay_trial(self.space, params)
            config_text, summary = cfg.to_yaml(), cfg.summary()
        except SpaceError as exc:  # logged, and the trial itself will fail with the same error
            config_text, summary = f"# could not rebuild the trial config: {exc}\n", "invalid"
        self.summaries[trial.trial_id] = summary
        run = self._client().create_run(self.search.experiment_id, run_name=f"trial-{number:03d}", tags={
            "mlflow.parentRunId": self.search.run_id, "mps.kind": "trial", "mps.status": STATUS_RUNNING,
            "mps.summary": summary, "mps.ray_trial_id": trial.trial_id})
        run_id = run.info.run_id
        self.run_ids[trial.trial_id] = run_id
        self._client().log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        self._client().log_text(run_id, config_text, CONFIG_ARTIFACT)
        self.echo(f"[{number:>3}/{self.total}] start  {summary}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("step", result.get("training_iteration", 0)))
        metrics = [_metric(k, result[k], step) for k in CURVE_KEYS if _finite(result.get(k))]
        if result.get(FINISHED):
            metrics += [_metric(k, result[k], step) for k in FINAL_KEYS + tuple(
                k for k in result if k.startswith("params_")) if k not in CURVE_KEYS and _finite(result.get(k))]
        if metrics:
            self._client().log_batch(run_id, metrics=metrics)
        if not result.get(FINISHED):
            self.echo(f"[{self.numbers[trial.trial_id]:>3}/{self.total}] step {step:>5}  "
                      f"val_acc {result.get('val_accuracy', float('nan')):.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        status = STATUS_FINISHED if last.get(FINISHED) else STATUS_STOPPED
        self._end(trial, status, "FINISHED")
        n = self.numbers.get(trial.trial_id, 0)
        if status == STATUS_FINISHED:
            self.echo(f"[{n:>3}/{self.total}] done   val_acc {last.get('val_accuracy', float('nan')):.3f}  "
                      f"test_acc {last.get('test_accuracy', float('nan')):.3f}  "
                      f"params {int(last.get('trainable_params', 0)):,}  {self.summaries.get(trial.trial_id, '')}")
        else:
            self.echo(f"[{n:>3}/{self.total}] stopped early at step {last.get('step', '?')} "
                      f"(val_acc {last.get('val_accuracy', float('nan')):.3f})")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        message = _error_text(trial)
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            self._client().set_tag(run_id, "mps.error", message[-4000:])
        self._end(trial, STATUS_FAILED, "FAILED")
        last_line = message.strip().splitlines()[-1] if message.strip() else "unknown error"
        self.echo(f"[{self.numbers.get(trial.trial_id, 0):>3}/{self.total}] FAILED {last_line}")

    def _end(self, trial, status: str, mlflow_status: str) -> None:
        self.statuses[trial.trial_id] = status
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        self._client().set_tag(run_id, "mps.status", status)
        self._client().set_terminated(run_id, mlflow_status)

    def counts(self) -> dict[str, int]:
        out = {STATUS_FINISHED: 0, STATUS_STOPPED: 0, STATUS_FAILED: 0}
        for s in self.statuses.values():
            out[s] = out.get(s, 0) + 1
        return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text()
    return str(getattr(trial, "error_msg", "") or "")
