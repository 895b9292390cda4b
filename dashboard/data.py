"""What the dashboard computes from stored results, kept free of Streamlit so that it is tested as plain functions.

Everything here reads: MLflow through ``search.results``, and the Optuna study through a storage opened
read-only. Nothing writes to either store, and nothing imports ray or torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from search import results
from space.metrics import METRICS, direction, kind, quality_metric, size_metric

# A search whose tag still says running, whose MLflow run is still RUNNING, but in which no trial has started,
# reported or ended for this long has lost its driver (killed and never resumed): it is shown as stale, not as
# running. Rungs of the default budget take minutes, so an hour of silence is well past any live search's gap.
STALE_AFTER = pd.Timedelta(hours=1)
STATE_STALE = "stale"
STATE_KILLED = "killed"

# Method families, by the prefix of the method's name in space.methods.METHOD_SPACES (the order is the legend's).
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LoRA", ("lora_",)),
    ("ProDiaL", ("prodial_",)),
    ("parameter deltas", ("a_log_delta", "d_delta", "conv1d_delta", "dt_bias_delta", "norm_delta", "bitfit",
                          "sdt")),
    ("prompts", ("prompt_tuning", "affix_tuning")),
    ("state", ("additional_scan", "initial_state", "state_offset")),
    ("adapters", ("parallel_adapter",)),
)
NO_METHOD = "no method"
BASELINE_FAMILY = "baseline"

REFERENCE_PHASES = (results.REEVALUATE, results.BASELINE)  # runs that repeat or stand beside the search
PARAM = "param."
_METHOD = re.compile(r"([a-z][a-z0-9_]*)(?:\(r=\d+\))?")  # one part of a summary: lora_in_proj(r=2)


def method_names(summary: str) -> list[str]:
    """The methods of a trial from its ``mps.summary`` tag (``TrialConfig.summary``): ``lora_in_proj(r=2) +
    a_log_delta`` names two; ``head only`` and baselines name none."""
    parts = [part.strip() for part in summary.split(" + ")]
    if not all(_METHOD.fullmatch(part) for part in parts):
        return []
    return [_METHOD.fullmatch(part).group(1) for part in parts]  # type: ignore[union-attr]


def family(method: str) -> str:
    for name, prefixes in FAMILIES:
        if any(method.startswith(p) for p in prefixes):
            return name
    return "other"


def trial_family(summary: str) -> str:
    """The families a trial combines, in legend order (``LoRA + parameter deltas``)."""
    if summary.startswith("baseline:"):
        return BASELINE_FAMILY
    found = {family(m) for m in method_names(summary)}
    ordered = [name for name, _ in FAMILIES if name in found] + sorted(found - {n for n, _ in FAMILIES})
    return " + ".join(ordered) or NO_METHOD


def searched(df: pd.DataFrame) -> pd.DataFrame:
    """Trials of the searched phases: not re-evaluation seeds, not baselines."""
    if df.empty or "phase" not in df:
        return df
    return df[~df.phase.isin(REFERENCE_PHASES)]


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.status == results.STATUS_FINISHED] if "status" in df else df.iloc[0:0]


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
CONNECT_TIMEOUT_S = 5


def check_database(uri: str) -> None:
    """Raise (naming the cause) when a database store does not answer within seconds: MLflow itself retries a
    refused connection for about 100 s before it gives up."""
    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_SCHEMES:
        return
    import sqlalchemy

    timeout = {"connect_timeout": CONNECT_TIMEOUT_S} if uri.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=timeout, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


# -- the search's state -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchState:
    state: str  # the mps.status tag, or STATE_STALE / STATE_KILLED for a running search without a driver
    live: bool  # still running: the dashboard refreshes itself
    last_event: pd.Timestamp | None
    note: str


def last_event(search_start: pd.Timestamp, df: pd.DataFrame, reported: Iterable[pd.Timestamp] = ()) -> pd.Timestamp:
    """The latest sign of life of a search: its start, any trial's start or end, and ``reported`` (metric
    timestamps of its running trials and of its hypervolume curve)."""
    times = [search_start, *reported]
    for column in ("start_time", "end_time"):
        if column in df:
            times += [t for t in df[column] if not pd.isna(t)]
    return max(times)


def search_state(tag: str, run_status: str, last: pd.Timestamp | None, now: pd.Timestamp,
                 stale_after: pd.Timedelta = STALE_AFTER) -> SearchState:
    """Whether a search is running, by one rule (see ``STALE_AFTER``):

    - its ``mps.status`` tag says how it ended (finished, failed, interrupted): that;
    - the tag says running but MLflow's run has ended (KILLED, FAILED): the driver stopped without recording a
      state, ``killed``;
    - the tag says running, the run is RUNNING, and nothing happened for ``stale_after``: ``stale``;
    - otherwise it is running."""
    if tag and tag != results.STATUS_RUNNING:
        return SearchState(tag, False, last, "")
    if run_status and run_status != "RUNNING":
        return SearchState(STATE_KILLED, False, last, f"its MLflow run is {run_status} but it never recorded how it "
                                                      "ended: its driver was stopped")
    if last is not None and now - last > stale_after:
        return SearchState(STATE_STALE, False, last, f"no trial has started, reported or ended for "
                                                     f"{_age(now - last)} (more than {_age(stale_after)}): its "
                                                     "driver was most likely killed and never resumed")
    return SearchState(results.STATUS_RUNNING, True, last, "")


def _age(delta: pd.Timedelta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def reported_times(c: Any, search_run_id: str, df: pd.DataFrame, metrics: Sequence[str]) -> list[pd.Timestamp]:
    """Timestamps of the latest values of ``metrics`` logged by the running trials, and of the search's
    hypervolume: what a live search writes between a trial's start and its end."""
    out: list[pd.Timestamp] = []
    running = df[df.status == results.STATUS_RUNNING].run_id if "status" in df else []
    for run_id, metric in [(search_run_id, "hypervolume"), *((r, m) for r in running for m in metrics)]:
        history = c.get_metric_history(run_id, metric)
        if history:
            out.append(pd.to_datetime(max(m.timestamp for m in history), unit="ms"))
    return out


# -- progress ---------------------------------------------------------------------------------------------------
def history(c: Any, run_id: str, metric: str) -> pd.DataFrame:
    """A metric's logged history as (step, value), in step order."""
    points = sorted(c.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return pd.DataFrame({"step": [m.step for m in points], "value": [m.value for m in points]})


def best_so_far(df: pd.DataFrame, quality: str) -> pd.DataFrame:
    """Best ``quality`` of the finished searched trials after each completed searched trial (any state), in the
    order they ended: (completed, trial, best)."""
    done = searched(df)
    if done.empty or "end_time" not in done:
        return pd.DataFrame(columns=["completed", "trial", "best"])
    done = done[done.status != results.STATUS_RUNNING].sort_values(["end_time", "trial"], kind="stable")
    sign = 1.0 if direction(quality) == "max" else -1.0
    best, rows = -math.inf, []
    for i, (_, row) in enumerate(done.iterrows(), start=1):
        value = row.get(quality)
        if row.status == results.STATUS_FINISHED and _finite(value):
            best = max(best, sign * float(value))
        rows.append({"completed": i, "trial": row.trial, "best": sign * best if math.isfinite(best) else math.nan})
    return pd.DataFrame(rows)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- methods ----------------------------------------------------------------------------------------------------
def method_columns(df: pd.DataFrame) -> list[str]:
    """Every method any trial used, from the summaries."""
    seen: dict[str, None] = {}
    for summary in df.get("methods", []):
        seen.update(dict.fromkeys(method_names(str(summary))))
    return list(seen)


def method_marginals(df: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """For each method: how many finished searched trials used it and how many did not, and the mean of each
    objective with and without it. The difference is a marginal effect, not a controlled one: the trials with a
    method also differ in the others."""
    done = finished(searched(df))
    rows = []
    for method in method_columns(done):
        used = done.methods.map(lambda s, m=method: m in method_names(str(s)))
        row: dict[str, Any] = {"method": method, "family": family(method), "trials with": int(used.sum()),
                               "trials without": int((~used).sum())}
        for m in objectives:
            if m in done:
                values = pd.to_numeric(done[m], errors="coerce")
                row[f"{m} with"] = values[used].mean()
                row[f"{m} without"] = values[~used].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def param_columns(df: pd.DataFrame) -> list[str]:
    """The sampled hyperparameters (``param.*``) that vary between trials; the seed is not one."""
    return [c for c in df.columns if c.startswith(PARAM) and c != f"{PARAM}seed" and df[c].nunique(dropna=True) > 1]


def param_marginals(df: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """For each searched hyperparameter and each value it took (a numeric range in quartile bins): the
    finished searched trials with that value and their mean objectives."""
    done = finished(searched(df))
    rows = []
    for column in param_columns(done):
        raw = done[column].dropna()
        numbers = pd.to_numeric(raw, errors="coerce")
        if numbers.notna().all() and numbers.nunique() > 4:
            groups = pd.qcut(numbers, q=4, duplicates="drop").astype(str)
        else:
            groups = raw.astype(str)
        for value, index in groups.groupby(groups).groups.items():
            row: dict[str, Any] = {"hyperparameter": column.removeprefix(PARAM), "value": value,
                                   "trials": len(index)}
            for m in objectives:
                if m in done:
                    row[m] = pd.to_numeric(done.loc[index, m], errors="coerce").mean()
            rows.append(row)
    return pd.DataFrame(rows)


def _parse(text: Any) -> Any:
    """An MLflow param (a string) back to the value Optuna sampled."""
    if not isinstance(text, str):
        return text
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def rebuilt_study(df: pd.DataFrame, objectives: Sequence[str]) -> Any:
    """An in-memory Optuna study holding the finished searched trials, their params parsed from MLflow and their
    objective values: what ``optuna.importance`` needs when the search's own study cannot be reached. Ranges are
    those the trials took (a numeric range spanning two decades is read as logarithmic)."""
    import optuna

    done = finished(searched(df))
    columns = param_columns(done)
    distributions: dict[str, Any] = {}
    for column in columns:
        values = [_parse(v) for v in done[column].dropna()]
        name = column.removeprefix(PARAM)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            distributions[name] = optuna.distributions.IntDistribution(min(values), max(values))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            low, high = float(min(values)), float(max(values))
            distributions[name] = optuna.distributions.FloatDistribution(low, high,
                                                                         log=low > 0 and high / low >= 100)
        else:
            distributions[name] = optuna.distributions.CategoricalDistribution(sorted(set(values), key=str))
    study = optuna.create_study(directions=["maximize" if direction(m) == "max" else "minimize"
                                            for m in objectives])
    for _, row in done.iterrows():
        values = [row.get(m) for m in objectives]
        if not all(_finite(v) for v in values):
            continue
        params = {c.removeprefix(PARAM): _parse(row[c]) for c in columns if not pd.isna(row[c])}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params}, values=[float(v) for v in values]))
    return study


def importances(study: Any, objectives: Sequence[str]) -> pd.DataFrame:
    """Optuna's fANOVA parameter importances for each objective: one row per parameter, one column per
    objective. Optuna scores only parameters every complete trial has, so a method's own hyperparameters (its
    rank, say) appear only where the method is always on; the per-method marginals cover the rest."""
    import optuna

    columns = {}
    for i, m in enumerate(objectives):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        columns[m] = optuna.importance.get_param_importances(
            study, evaluator=evaluator, target=_objective(i))
    table = pd.DataFrame(columns).fillna(0.0)
    table.index.name = "hyperparameter"
    return table.sort_values(list(objectives)[0], ascending=False)


def _objective(i: int) -> Any:
    def value(trial: Any) -> float:
        return float(trial.values[i])

    return value


def optuna_storage_default(tracking_uri: str) -> str:
    """Where ``search.run`` puts the study beside a sqlite MLflow store (``runs/optuna.db`` next to
    ``runs/mlflow.db``), if that file exists; else empty (the MLflow params are used instead)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///")).with_name("optuna.db")
        if path.exists():
            return f"sqlite:///{path}"
    return ""


def open_studies(storage_url: str, study_name: str) -> list[Any]:
    """The search's Optuna studies (``NAME``, or ``NAME-stage1`` and ``NAME-stage2`` for a two-stage search),
    opened without writing: a sqlite file read-only, another database without creating tables."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage_url.startswith("sqlite:///"):
        path = Path(storage_url.removeprefix("sqlite:///"))
        if not path.exists():
            raise FileNotFoundError(f"no Optuna storage at {path}")
        storage = optuna.storages.RDBStorage(f"sqlite:///file:{path}?mode=ro&uri=true",
                                             skip_compatibility_check=True, skip_table_creation=True)
    else:
        storage = optuna.storages.RDBStorage(storage_url, skip_compatibility_check=True, skip_table_creation=True)
    names = set(optuna.get_all_study_names(storage))
    wanted = [n for n in (study_name, f"{study_name}-stage1", f"{study_name}-stage2") if n in names]
    return [optuna.load_study(study_name=n, storage=storage) for n in wanted]


def study_name(c: Any, search_run_id: str, run_name: str) -> str:
    """``search.study_name`` from the search's logged space.yaml, else the run name (``search.run``'s default)."""
    try:
        text = c.download_artifacts(search_run_id, "space.yaml")
        data = yaml.safe_load(Path(text).read_text()) or {}
        return str((data.get("search") or {}).get("study_name") or run_name)
    except Exception:  # no space.yaml (or not readable): the default name
        return run_name


def complete_values(study: Any) -> int:
    import optuna

    return sum(1 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.values)


# -- trials -----------------------------------------------------------------------------------------------------
def curves(c: Any, runs: dict[str, str], metric: str) -> pd.DataFrame:
    """The logged history of ``metric`` for each run (``{trial name: run id}``): (trial, step, value)."""
    frames = [history(c, run_id, metric).assign(trial=name) for name, run_id in runs.items()]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "value", "trial"])


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: ``training.learning_rate``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_diff(configs: dict[str, str]) -> pd.DataFrame:
    """The keys whose values differ between the configs (``{trial name: YAML}``), one column per trial; a key
    a config lacks (a method it leaves off) shows as empty."""
    flat = {name: flatten(yaml.safe_load(text) or {}) for name, text in configs.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    rows = [{"key": k, **{name: _shown(f.get(k)) for name, f in flat.items()}} for k in keys]
    table = pd.DataFrame(rows, columns=["key", *configs])
    if table.empty:
        return table
    differs = table[list(configs)].nunique(axis=1, dropna=False) > 1
    return table[differs].reset_index(drop=True)


def _shown(value: Any) -> str:
    return "" if value is None else str(value)


def axis_metrics(df: pd.DataFrame) -> list[str]:
    """The metrics of the table in space.metrics that finished trials logged, for the front's axes."""
    done = finished(df)
    return [m for m in METRICS if m in done and pd.to_numeric(done[m], errors="coerce").notna().any()]


def quality_axes(metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if kind(m) in ("rung", "report")]


def cost_axes(metrics: Sequence[str]) -> list[str]:
    return [m for m in metrics if kind(m) in ("size", "cost")]


def base_params(df: pd.DataFrame) -> float | None:
    """The base model's parameter count, from a trial that logged both its count and its percentage."""
    if "trainable_params" not in df or "trainable_pct" not in df:
        return None
    both = df[(pd.to_numeric(df.trainable_pct, errors="coerce") > 0)
              & (pd.to_numeric(df.trainable_params, errors="coerce") > 0)]
    if both.empty:
        return None
    row = both.iloc[0]
    return float(row.trainable_params) * 100.0 / float(row.trainable_pct)


def objective_names(objectives: Sequence[str]) -> tuple[str, str | None]:
    """(quality, size) of a search's objectives; quality falls back to the first objective."""
    try:
        quality = quality_metric(objectives)
    except ValueError:
        quality = objectives[0]
    return quality, size_metric(objectives)
