"""Read a search's trials back from MLflow; used by the end-of-search table, the dashboard and export.

MLflow layout written by ``search.tracking``: one parent run per search (tag ``mps.kind=search``, the
``hypervolume`` curve), one child run per trial (``mps.kind=trial``, ``mlflow.parentRunId`` set to the search's
run), the trial's state in the tag ``mps.status`` (one of ``space.metrics.TRIAL_STATES``), its phase in
``mps.phase`` (``search``, ``stage1``, ``stage2``, ``reevaluate``), its sampled hyperparameters as params,
metrics with their curves, and ``trial_config.yaml`` as an artifact. A re-evaluation run names the trial whose
configuration it repeats in ``mps.reevaluates``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from search.pareto import pareto_indices
from space.metrics import DEFAULT_OBJECTIVES, TRIAL_STATES, direction, quality_metric, size_metric, test_metric
from space.secrets import mask

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
DEFAULT_EXPERIMENT = "mamba-peft-search"
CONFIG_ARTIFACT = "trial_config.yaml"

STATUS_RUNNING, STATUS_FINISHED, STATUS_PRUNED, STATUS_FAILED, STATUS_INTERRUPTED, STATUS_DUPLICATE, \
    STATUS_REJECTED = TRIAL_STATES
REEVALUATE = "reevaluate"
BASELINE = "baseline"  # search.baselines: references drawn beside the front, never on it


class ResultsError(LookupError):
    """No such experiment, search or trial; the message names what was looked for and where."""


def quiet_store_logs() -> None:
    """Silence a new MLflow store's "Creating initial MLflow database tables..." / "Updating database tables" INFO
    lines, which would open every first search's or training's output; errors and warnings still show."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def client(tracking_uri: str):
    if not tracking_uri or not tracking_uri.strip():
        raise ResultsError("no MLflow tracking URI given")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.exists():
            raise ResultsError(f"no MLflow store at {db} (tracking URI {mask(tracking_uri)}); run a search first")
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(c, experiment: str) -> str:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise ResultsError(f"no MLflow experiment named {experiment!r} at {mask(c.tracking_uri)}")
    return exp.experiment_id


def searches(c, experiment: str) -> pd.DataFrame:
    """Parent runs, newest first."""
    runs = c.search_runs([experiment_id(c, experiment)], filter_string="tags.`mps.kind` = 'search'",
                         order_by=["attributes.start_time DESC"], max_results=1000)
    return pd.DataFrame([{
        "run_id": r.info.run_id, "name": r.info.run_name, "status": r.data.tags.get("mps.status", ""),
        "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
        "objectives": json.loads(r.data.tags.get("mps.objectives", json.dumps(DEFAULT_OBJECTIVES))),
        "trials": r.data.params.get("num_trials"),
        # MLflow's own run state and end: a search whose tag says running but whose run ended was killed.
        "run_status": r.info.status,
        "end_time": pd.to_datetime(r.info.end_time, unit="ms") if r.info.end_time else None,
    } for r in runs])


def latest_search(c, experiment: str) -> dict[str, Any]:
    df = searches(c, experiment)
    if df.empty:
        raise ResultsError(f"experiment {experiment!r} at {mask(c.tracking_uri)} has no search runs")
    return df.iloc[0].to_dict()


def search_info(c, experiment: str, search_run_id: str | None) -> dict[str, Any]:
    if search_run_id is None:
        return latest_search(c, experiment)
    df = searches(c, experiment)
    match = df[df.run_id == search_run_id]
    if match.empty:
        raise ResultsError(f"no search run {search_run_id!r} in experiment {experiment!r}")
    return match.iloc[0].to_dict()


def trials(c, experiment: str, search_run_id: str, detail: bool = False) -> pd.DataFrame:
    """One row per trial of a search: run id, name, status, summary, params (``param.*``), metrics. ``detail`` adds
    the run's ``start_time`` and ``end_time`` (NaT while it runs), its ``error`` (the ``mps.error`` tag), and where it
    trained: ``device`` and ``kernel`` (the ``mps.device`` and ``mps.kernel`` tags; empty when not logged)."""
    runs = c.search_runs([experiment_id(c, experiment)],
                         filter_string=f"tags.`mlflow.parentRunId` = '{search_run_id}'", max_results=50000)
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run_id": r.info.run_id, "trial": r.info.run_name,
                               "status": r.data.tags.get("mps.status", STATUS_RUNNING),
                               "phase": r.data.tags.get("mps.phase", "search"),
                               "reevaluates": r.data.tags.get("mps.reevaluates", ""),
                               "methods": r.data.tags.get("mps.summary", "")}
        if detail:
            row.update(start_time=pd.to_datetime(r.info.start_time, unit="ms"),
                       end_time=pd.to_datetime(r.info.end_time, unit="ms") if r.info.end_time else pd.NaT,
                       error=r.data.tags.get("mps.error", ""), device=r.data.tags.get("mps.device", ""),
                       kernel=r.data.tags.get("mps.kernel", ""))
        row.update(r.data.metrics)
        row.update({f"param.{k}": v for k, v in r.data.params.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values("trial", kind="stable").reset_index(drop=True)
    return df


def pareto(df: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """Finished trials on the Pareto front of ``objectives``, best first (see ``ranking_metric``). Only trials that
    trained the full budget qualify: pruned, failed and interrupted trials never do, duplicates repeat a trial
    that is already there, re-evaluation runs are seeds of a front trial (``reevaluated``), and baselines are
    references (``baselines``)."""
    if df.empty or "status" not in df or any(m not in df for m in objectives):
        return df.iloc[0:0]
    phase = df.get("phase", pd.Series("search", index=df.index))
    done = df[(df.status == STATUS_FINISHED) & ~phase.isin([REEVALUATE, BASELINE])].reset_index(drop=True)
    idx = pareto_indices(done.to_dict("records"), objectives)
    front = done.iloc[idx]
    key = ranking_metric(objectives)
    return front.sort_values(key, ascending=direction(key) == "min", kind="stable").reset_index(drop=True)


def baselines(df: pd.DataFrame) -> pd.DataFrame:
    """The finished baseline trials (``search.baselines``) of a search."""
    if df.empty or "phase" not in df or "status" not in df:
        return df.iloc[0:0]
    return df[(df.phase == BASELINE) & (df.status == STATUS_FINISHED)].reset_index(drop=True)


def reevaluated(df: pd.DataFrame, front: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """The front with the spread of its re-evaluated configurations.

    For each front trial: ``seeds`` (its own run plus its finished re-evaluation runs), the mean and standard
    deviation of the quality objective over them, and the mean of its test-split twin (``test_metric``).
    ``noise`` names the front trial no larger than this one whose mean it does not beat by more than two standard
    errors of the difference: the advantage that makes this configuration worth its extra parameters is within
    the noise. Trials that were not re-evaluated get one seed and no spread.
    """
    if front.empty:
        return front
    quality = quality_metric(objectives)
    test_name = test_metric(quality)
    sign = 1.0 if direction(quality) == "max" else -1.0
    out = front.copy()
    seeds, means, stds, tests = [], [], [], []
    for _, row in front.iterrows():
        runs = df[(df.get("reevaluates", "") == row["trial"]) & (df.status == STATUS_FINISHED)]
        values = [float(row[quality]), *runs[quality].astype(float)]
        test = [float(row.get(test_name, float("nan"))), *runs.get(test_name, pd.Series(dtype=float))]
        seeds.append(len(values))
        means.append(float(pd.Series(values).mean()))
        stds.append(float(pd.Series(values).std(ddof=1)) if len(values) > 1 else float("nan"))
        tests.append(float(pd.Series(test, dtype=float).mean()))
    out["seeds"], out[f"{quality}_mean"], out[f"{quality}_std"], out[f"{test_name}_mean"] = seeds, means, stds, tests
    size = size_metric(objectives)
    size = size if size in out else None
    noise: list[str] = []
    for i, row in out.iterrows():
        note = ""
        if row["seeds"] > 1 and size is not None:
            smaller = out[(out[size] <= row[size]) & (out.index != i) & (out["seeds"] > 1)]
            for _, other in smaller.iterrows():
                gap = sign * (row[f"{quality}_mean"] - other[f"{quality}_mean"])
                se = (row[f"{quality}_std"] ** 2 / row["seeds"] + other[f"{quality}_std"] ** 2 / other["seeds"]) ** 0.5
                if gap <= 2 * se:
                    note = f"within noise of {other['trial']}"
                    break
        noise.append(note)
    out["noise"] = noise
    return out


def ranking_metric(objectives: list[str]) -> str:
    """The objective that orders a front for "best": the quality objective (measured at every rung), else (a
    dashboard axis pair without one) the first objective."""
    try:
        return quality_metric(objectives)
    except ValueError:
        return objectives[0]


def best_trial(front: pd.DataFrame, objectives: list[str]) -> dict[str, Any] | None:
    """The front's best trial: the highest mean of the quality objective over its seeds where the front was
    re-evaluated (``reevaluated``), else its single value; ties go to the smaller configuration."""
    if front.empty:
        return None
    key = ranking_metric(objectives)
    mean = f"{key}_mean"
    order = mean if mean in front else key
    size = size_metric(objectives)
    by = [order, size] if size in front else [order]
    ascending = [direction(key) == "min", True][: len(by)]
    return front.sort_values(by, ascending=ascending, kind="stable").iloc[0].to_dict()


def pick_trial(front: pd.DataFrame, objectives: list[str], pick: str) -> dict[str, Any] | None:
    """The front trial ``pick`` names (``python -m search.export --pick``):

    - ``best``: ``best_trial``;
    - ``knee``: the front's knee, the trial farthest from the straight line joining its two ends (the smallest and
      the best trial) in (log10 size, quality) scaled to [0, 1] on both axes: where giving up parameters starts to
      cost much more quality. A front of fewer than 3 trials has no knee, and ``best`` is taken;
    - ``budget=N`` or ``budget=P%``: the best trial with at most N trainable parameters, or at most P percent of
      the base model (the ``trainable_pct`` metric). None when no front trial fits.
    A malformed ``pick`` is a ValueError naming it."""
    size = size_metric(objectives) or "trainable_params"
    if pick == "best":
        return best_trial(front, objectives)
    if pick.startswith("budget="):
        raw = pick.removeprefix("budget=").strip()
        column, text = ("trainable_pct", raw[:-1]) if raw.endswith("%") else ("trainable_params", raw)
        try:
            limit = float(text.replace(",", "").replace("_", ""))
        except ValueError:
            raise ValueError(f"--pick {pick!r}: the budget must be a count (budget=20000) or a percentage "
                             f"(budget=2%)") from None
        if column not in front:
            return None
        return best_trial(front[front[column] <= limit], objectives)
    if pick != "knee":
        raise ValueError(f"--pick {pick!r}: expected best, knee, budget=<count> or budget=<percent>%")
    if len(front) < 3 or size not in front:
        return best_trial(front, objectives)
    key = ranking_metric(objectives)
    value = front[f"{key}_mean"] if f"{key}_mean" in front else front[key]
    quality = value.astype(float) * (1.0 if direction(key) == "max" else -1.0)
    x = np.log10(front[size].astype(float).clip(lower=1.0))
    xs = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    ys = (quality - quality.min()) / max(float(quality.max() - quality.min()), 1e-12)
    # The ends: the smallest trial (x = 0) and the best one (y = 1); distance of every trial from that chord.
    x0, y0 = float(xs.min()), float(ys[xs.idxmin()])
    x1, y1 = float(xs[ys.idxmax()]), float(ys.max())
    distance = ((y1 - y0) * xs - (x1 - x0) * ys + x1 * y0 - y1 * x0).abs()
    return front.loc[distance.idxmax()].to_dict()


def trial_config_text(c, run_id: str) -> str:
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(c.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)).read_text()
    except Exception as exc:
        raise ResultsError(f"trial run {run_id}: cannot read its {CONFIG_ARTIFACT}: {exc}") from exc
