"""Read a search's trials back from MLflow; used by the end-of-search table, the dashboard and export.

MLflow layout written by ``search.tracking``: one parent run per search (tag ``mps.kind=search``), one child
run per trial (``mps.kind=trial``, ``mlflow.parentRunId`` set to the search's run), the trial's status in the
tag ``mps.status`` (``running``, ``finished``, ``stopped`` by early stopping, ``failed``), its sampled
hyperparameters as params, metrics with their curves, and ``trial_config.yaml`` as an artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from search.pareto import pareto_indices
from space.metrics import direction

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
DEFAULT_EXPERIMENT = "mamba-peft-search"
CONFIG_ARTIFACT = "trial_config.yaml"

STATUS_FINISHED = "finished"
STATUS_STOPPED = "stopped"
STATUS_FAILED = "failed"
STATUS_RUNNING = "running"


class ResultsError(LookupError):
    """No such experiment, search or trial; the message names what was looked for and where."""


def client(tracking_uri: str):
    if not tracking_uri or not tracking_uri.strip():
        raise ResultsError("no MLflow tracking URI given")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.exists():
            raise ResultsError(f"no MLflow store at {db} (tracking URI {tracking_uri}); run a search first")
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, experiment: str) -> str:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ResultsError(f"no MLflow experiment named {experiment!r} at {c.tracking_uri}")
    return exp.experiment_id


def searches(c, experiment: str) -> pd.DataFrame:
    """Parent runs, newest first."""
    runs = c.search_runs([experiment_id(c, experiment)], filter_string="tags.`mps.kind` = 'search'",
                         order_by=["attributes.start_time DESC"], max_results=1000)
    return pd.DataFrame([{
        "run_id": r.info.run_id, "name": r.info.run_name, "status": r.data.tags.get("mps.status", ""),
        "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
        "objectives": json.loads(r.data.tags.get("mps.objectives", '["val_accuracy", "trainable_params"]')),
        "trials": r.data.params.get("num_trials"),
    } for r in runs])


def latest_search(c, experiment: str) -> dict[str, Any]:
    df = searches(c, experiment)
    if df.empty:
        raise ResultsError(f"experiment {experiment!r} at {c.tracking_uri} has no search runs")
    return df.iloc[0].to_dict()


def search_info(c, experiment: str, search_run_id: str | None) -> dict[str, Any]:
    if search_run_id is None:
        return latest_search(c, experiment)
    df = searches(c, experiment)
    match = df[df.run_id == search_run_id]
    if match.empty:
        raise ResultsError(f"no search run {search_run_id!r} in experiment {experiment!r}")
    return match.iloc[0].to_dict()


def trials(c, experiment: str, search_run_id: str) -> pd.DataFrame:
    """One row per trial of a search: run id, name, status, summary, params (``param.*``), metrics."""
    runs = c.search_runs([experiment_id(c, experiment)],
                         filter_string=f"tags.`mlflow.parentRunId` = '{search_run_id}'", max_results=50000)
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run_id": r.info.run_id, "trial": r.info.run_name,
                               "status": r.data.tags.get("mps.status", STATUS_RUNNING),
                               "methods": r.data.tags.get("mps.summary", "")}
        row.update(r.data.metrics)
        row.update({f"param.{k}": v for k, v in r.data.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("trial", kind="stable").reset_index(drop=True)
    return df


def pareto(df: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """Finished trials on the Pareto front of ``objectives``, best first (see ``ranking_metric``). Stopped and
    failed trials never qualify: their metrics are not those of a full trial."""
    if df.empty or "status" not in df or any(m not in df for m in objectives):
        return df.iloc[0:0]
    done = df[df.status == STATUS_FINISHED].reset_index(drop=True)
    idx = pareto_indices(done.to_dict("records"), objectives)
    front = done.iloc[idx]
    key = ranking_metric(objectives)
    return front.sort_values(key, ascending=direction(key) == "min", kind="stable").reset_index(drop=True)


def ranking_metric(objectives: list[str]) -> str:
    """The objective that orders a front for "best": the first maximised one (accuracy), else the first."""
    return next((m for m in objectives if direction(m) == "max"), objectives[0])


def best_trial(front: pd.DataFrame, objectives: list[str]) -> dict[str, Any] | None:
    """The front's best trial by ``ranking_metric`` (the most accurate Pareto trial by default)."""
    if front.empty:
        return None
    key = ranking_metric(objectives)
    if key not in front:
        return front.iloc[0].to_dict()
    return front.sort_values(key, ascending=direction(key) == "min", kind="stable").iloc[0].to_dict()


def trial_config_text(c, run_id: str) -> str:
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(c.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
    except Exception as exc:
        raise ResultsError(f"trial run {run_id}: cannot read its {CONFIG_ARTIFACT}: {exc}") from exc
