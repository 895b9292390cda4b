"""Prepared stores for the dashboard's tests, laid out as ``search.tracking`` and ``search.run`` write them: an
MLflow sqlite store with one experiment per situation (a normal finished search, no searches, all trials failed,
nothing finished, a search still running, one killed and left RUNNING, one whose run was killed), and the
finished search's Optuna study beside it (``optuna.db``, as ``search.run`` puts it)."""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from streamlit.testing.v1 import AppTest

from search import results
from space.config import SearchSpace, TrialConfig, sample_trial

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"
TIMEOUT = 60

EMPTY_EXPERIMENT = "no-searches-yet"
UNFINISHED_EXPERIMENT = "nothing-finished"
FAILED_EXPERIMENT = "all-failed"
RUNNING_EXPERIMENT = "still-running"
STALE_EXPERIMENT = "killed-left-running"
KILLED_EXPERIMENT = "run-killed"
FAILURE_REASON = "FloatingPointError: loss is nan at step 12"

SPACE = SearchSpace(methods={
    "lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2, 4, 8]}},
    "a_log_delta": {"enabled": "search"},
})
BASE_PARAMS = 150_000
RUNGS = (120, 240, 480)

# name, status, val_accuracy, trainable_params, lora rank (None: LoRA off), A_log delta on
TRIALS = [
    ("trial-001", results.STATUS_FINISHED, 0.90, 5000, 8, True),
    ("trial-002", results.STATUS_FINISHED, 0.80, 1000, 2, False),
    ("trial-003", results.STATUS_FINISHED, 0.70, 3000, 4, False),  # dominated by trial-002
    ("trial-004", results.STATUS_PRUNED, 0.95, 500, 1, False),  # would dominate all, but was pruned
    ("trial-005", results.STATUS_FAILED, 0.99, 100, None, True),  # would dominate all, but failed
    ("trial-006", results.STATUS_FINISHED, 0.60, 400, None, False),
]
FRONT = {"trial-001", "trial-002", "trial-006"}
MOST_ACCURATE_ON_FRONT = "trial-001"
# Where the most accurate trial trained, as a CUDA trial's final report tags it (search.tracking).
DEVICE_TAGS = {"mps.device": "cuda:0 NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=0)",
               "mps.kernel": "torch: the fused kernel cannot apply parallel_adapter"}
FINISHED = [t[0] for t in TRIALS if t[1] == results.STATUS_FINISHED]
HYPERVOLUME = [0.0, 1.5, 2.0, 2.0, 2.0, 2.5]  # after each completed trial


@dataclass
class Store:
    uri: str
    root: Path
    search_run_id: str = ""
    trial_run_ids: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    running_search_id: str = ""
    stale_search_id: str = ""


def params_of(rank: int | None, a_log: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"lora_in_proj.enabled": rank is not None, "a_log_delta.enabled": a_log}
    if rank is not None:
        params["lora_in_proj.rank"] = rank
    return params


def config_of(rank: int | None, a_log: bool, seed: int) -> TrialConfig:
    return sample_trial(SPACE, optuna.trial.FixedTrial(params_of(rank, a_log)), seed=seed)


def make_search(c: MlflowClient, exp_id: str, name: str, start_ms: int, status: str = results.STATUS_FINISHED,
                run_status: str | None = "FINISHED") -> str:
    run = c.create_run(exp_id, run_name=name, start_time=start_ms, tags={
        "mps.kind": "search", "mps.status": status,
        "mps.objectives": json.dumps(["val_accuracy", "trainable_params"])})
    c.log_param(run.info.run_id, "num_trials", len(TRIALS))
    if run_status is not None:
        c.set_terminated(run.info.run_id, run_status, end_time=start_ms + 600_000)
    return run.info.run_id


def make_trial(c: MlflowClient, exp_id: str, parent: str, name: str, status: str, metrics: dict[str, float],
               config: TrialConfig, params: dict[str, Any] | None = None, start_ms: int | None = None,
               curve: dict[int, float] | None = None, tags: dict[str, str] | None = None) -> str:
    """A child run as ``MlflowTrialCallback`` leaves it: tags, params, the rung curve, final metrics, config; ended
    (``start_ms`` + 60 s) unless it is still running."""
    start_ms = int(time.time() * 1000) if start_ms is None else start_ms
    run = c.create_run(exp_id, run_name=name, start_time=start_ms, tags={
        "mlflow.parentRunId": parent, "mps.kind": "trial", "mps.status": status, "mps.phase": "search",
        "mps.summary": config.summary(), **(tags or {})})
    run_id = run.info.run_id
    for key, value in {**(params or {}), "seed": config.seed}.items():
        c.log_param(run_id, key, value)
    for i, (step, value) in enumerate(sorted((curve or {}).items())):
        c.log_metric(run_id, "val_accuracy", value, timestamp=start_ms + 10_000 * (i + 1), step=step)
        c.log_metric(run_id, "train_loss", 2.0 / (i + 1), timestamp=start_ms + 10_000 * (i + 1), step=step)
    for key, value in metrics.items():
        if key == "val_accuracy" and curve:  # its last rung is the final value, logged once
            continue
        c.log_metric(run_id, key, value, timestamp=start_ms + 50_000, step=max(curve or {0: 0}))
    c.log_text(run_id, config.to_yaml(), results.CONFIG_ARTIFACT)
    if status != results.STATUS_RUNNING:
        c.set_terminated(run_id, "FAILED" if status == results.STATUS_FAILED else "FINISHED",
                         end_time=start_ms + 60_000)
    return run_id


def _final_metrics(status: str, acc: float, n_params: int, seed: int = 0) -> tuple[dict[str, float], dict[int, float]]:
    """(final metrics, rung curve) of a trial in ``status`` that reached ``acc``."""
    size = {"trainable_params": n_params, "trainable_pct": 100.0 * n_params / BASE_PARAMS}
    if status in (results.STATUS_PRUNED, results.STATUS_FAILED):  # stopped after its first rung
        return {**size, "val_accuracy": acc}, {RUNGS[0]: acc}
    curve = {RUNGS[0]: acc - 0.2, RUNGS[1]: acc - 0.05, RUNGS[2]: acc}
    return {**size, "val_accuracy": acc, "test_accuracy": acc - 0.05, "train_seconds": 10.0 + n_params / 1000,
            "peak_memory_mb": 300.0 + 100 * seed, "steps_done": RUNGS[-1]}, curve


def _optuna_study(root: Path, name: str) -> None:
    """The finished search's study as ``PeftSearcher`` leaves it, in ``optuna.db`` beside ``mlflow.db``."""
    study = optuna.create_study(storage=f"sqlite:///{root / 'optuna.db'}", study_name=name,
                                directions=["maximize", "minimize"])
    dists = {"lora_in_proj.enabled": optuna.distributions.CategoricalDistribution([True, False]),
             "a_log_delta.enabled": optuna.distributions.CategoricalDistribution([True, False]),
             "lora_in_proj.rank": optuna.distributions.CategoricalDistribution([1, 2, 4, 8])}
    for _name, status, acc, n_params, rank, a_log in TRIALS:
        params = params_of(rank, a_log)
        state = {results.STATUS_FINISHED: optuna.trial.TrialState.COMPLETE,
                 results.STATUS_PRUNED: optuna.trial.TrialState.PRUNED}.get(status, optuna.trial.TrialState.FAIL)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in params}, state=state,
            values=[acc, n_params] if state == optuna.trial.TrialState.COMPLETE else None))


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    root = tmp_path_factory.mktemp("store")
    built = Store(uri=f"sqlite:///{root / 'mlflow.db'}", root=root)
    c = MlflowClient(tracking_uri=built.uri)
    art = (root / "art").as_uri()
    now = int(time.time() * 1000)
    hour = 3_600_000

    exp = c.create_experiment(results.DEFAULT_EXPERIMENT, artifact_location=art)
    old = make_search(c, exp, "older-search", now - 24 * hour)
    make_trial(c, exp, old, "trial-001", results.STATUS_FINISHED, {"val_accuracy": 0.5, "trainable_params": 10},
               config_of(None, False, seed=99), start_ms=now - 24 * hour)
    built.search_run_id = make_search(c, exp, "newest-search", now - 2 * hour)
    for seed, (name, status, acc, n_params, rank, a_log) in enumerate(TRIALS):
        config = config_of(rank, a_log, seed)
        built.configs[name] = config.to_yaml()
        metrics, curve = _final_metrics(status, acc, n_params, seed)
        built.trial_run_ids[name] = make_trial(
            c, exp, built.search_run_id, name, status, metrics, config, params_of(rank, a_log),
            start_ms=now - 2 * hour + (len(TRIALS) - seed) * 60_000, curve=curve,  # 006 ends first
            tags={"mps.error": FAILURE_REASON} if status == results.STATUS_FAILED
            else DEVICE_TAGS if name == MOST_ACCURATE_ON_FRONT else None)
    for step, value in enumerate(HYPERVOLUME, start=1):
        c.log_metric(built.search_run_id, "hypervolume", value, timestamp=now - 2 * hour + step * 60_000, step=step)
    c.log_metric(built.search_run_id, "steps_saved_by_pruning", 360)
    _optuna_study(root, "newest-search")

    c.create_experiment(EMPTY_EXPERIMENT, artifact_location=art)

    exp = c.create_experiment(UNFINISHED_EXPERIMENT, artifact_location=art)
    parent = make_search(c, exp, "all-stopped", now - hour)
    make_trial(c, exp, parent, "trial-001", results.STATUS_PRUNED, {"val_accuracy": 0.4}, config_of(2, False, 0),
               start_ms=now - hour)
    make_trial(c, exp, parent, "trial-002", results.STATUS_FAILED, {}, config_of(None, True, 1), start_ms=now - hour)

    exp = c.create_experiment(FAILED_EXPERIMENT, artifact_location=art)
    parent = make_search(c, exp, "every-trial-failed", now - hour, status=results.STATUS_FAILED, run_status="KILLED")
    for i in range(3):
        make_trial(c, exp, parent, f"trial-{i + 1:03d}", results.STATUS_FAILED, {}, config_of(2, True, i),
                   start_ms=now - hour, tags={"mps.error": FAILURE_REASON})

    # Live: its run is RUNNING, one trial finished a minute ago, one started and reported a rung just now.
    exp = c.create_experiment(RUNNING_EXPERIMENT, artifact_location=art)
    built.running_search_id = make_search(c, exp, "live-search", now - 300_000, status=results.STATUS_RUNNING,
                                          run_status=None)
    metrics, curve = _final_metrics(results.STATUS_FINISHED, 0.8, 1000)
    make_trial(c, exp, built.running_search_id, "trial-001", results.STATUS_FINISHED, metrics, config_of(2, False, 0),
               params_of(2, False), start_ms=now - 240_000, curve=curve)
    make_trial(c, exp, built.running_search_id, "trial-002", results.STATUS_RUNNING, {"trainable_params": 5000},
               config_of(8, True, 1), params_of(8, True), start_ms=now - 30_000, curve={RUNGS[0]: 0.5})
    c.log_metric(built.running_search_id, "hypervolume", 1.0, timestamp=now - 60_000, step=1)

    # Killed and never resumed: tag and run both say running, but nothing has happened for five hours.
    exp = c.create_experiment(STALE_EXPERIMENT, artifact_location=art)
    built.stale_search_id = make_search(c, exp, "abandoned-search", now - 6 * hour, status=results.STATUS_RUNNING,
                                        run_status=None)
    make_trial(c, exp, built.stale_search_id, "trial-001", results.STATUS_FINISHED, metrics, config_of(2, False, 0),
               params_of(2, False), start_ms=now - 6 * hour, curve=curve)
    make_trial(c, exp, built.stale_search_id, "trial-002", results.STATUS_RUNNING, {"trainable_params": 5000},
               config_of(8, True, 1), params_of(8, True), start_ms=now - 5 * hour)

    # Stopped without recording how: its tag says running, MLflow's run was ended KILLED.
    exp = c.create_experiment(KILLED_EXPERIMENT, artifact_location=art)
    parent = make_search(c, exp, "killed-search", now - hour, status=results.STATUS_RUNNING, run_status="KILLED")
    make_trial(c, exp, parent, "trial-001", results.STATUS_FINISHED, metrics, config_of(2, False, 0),
               params_of(2, False), start_ms=now - hour, curve=curve)
    return built


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_app(uri: str, *args: str) -> AppTest:
    """The app as ``streamlit run dashboard/app.py -- ARGS`` with MLFLOW_TRACKING_URI set to ``uri``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(sys, "argv", [str(APP), *args])
        return AppTest.from_file(APP, default_timeout=TIMEOUT).run()


@pytest.fixture
def run_app(monkeypatch: pytest.MonkeyPatch):
    """A fresh app run, to interact with: the environment stays set for the reruns that follow."""

    def run(uri: str, *args: str) -> AppTest:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(sys, "argv", [str(APP), *args])
        return AppTest.from_file(APP, default_timeout=TIMEOUT).run()

    return run


@pytest.fixture(scope="session")
def rendered(store: Store):
    """One untouched run of the app per experiment, shared by the tests that only read what it shows."""
    cache: dict[str, AppTest] = {}

    def get(experiment: str = results.DEFAULT_EXPERIMENT) -> AppTest:
        if experiment not in cache:
            cache[experiment] = start_app(store.uri, "--experiment", experiment)
        return cache[experiment]

    return get
