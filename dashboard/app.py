"""Streamlit dashboard over the searches stored in MLflow: the Pareto front, every trial, and the config of
the trial to keep, ready to download.

It only reads what ``search.tracking`` logged, through ``search.results``; it never trains, so nothing here
may import ray or torch. Launch it with

    streamlit run dashboard/app.py -- --tracking-uri sqlite:///runs/mlflow.db --experiment mamba-peft-search

or with no arguments to read ``MLFLOW_TRACKING_URI`` (else ``search.results.DEFAULT_TRACKING_URI``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from mlflow.exceptions import MlflowException

from search import results
from space.config import SpaceError, TrialConfig
from space.metrics import DEFAULT_OBJECTIVES, METRICS, direction, label
from space.secrets import mask

STATUS_STYLE = {  # status: (colour, marker symbol), in the order legends and counts list them
    results.STATUS_FINISHED: ("#1f77b4", "circle"),
    results.STATUS_PRUNED: ("#ff7f0e", "diamond"),
    results.STATUS_FAILED: ("#d62728", "x"),
    results.STATUS_RUNNING: ("#7f7f7f", "circle-open"),
    results.STATUS_INTERRUPTED: ("#8c564b", "x-open"),
    results.STATUS_DUPLICATE: ("#17becf", "circle-dot"),
    results.STATUS_REJECTED: ("#bcbd22", "square-open"),
}
FALLBACK_AXES = (DEFAULT_OBJECTIVES[1], DEFAULT_OBJECTIVES[0])  # (x, y) when the objectives make no 2-D front
TABLE_FORMATS = {  # metric shown in the trial table (where any trial logged it): its number format
    "val_accuracy": "%.3f", "test_accuracy": "%.3f", "trainable_params": "%.0f", "train_seconds": "%.1f",
    "peak_memory_mb": "%.0f"}
PARETO_COLUMN = "Pareto"
EXPORT_NAME = "best.yaml"


def launch_defaults(argv: Sequence[str]) -> argparse.Namespace:
    """Sidebar defaults from ``streamlit run dashboard/app.py -- --tracking-uri URI --experiment NAME``.

    Streamlit hands the script what follows ``--`` as ``sys.argv[1:]``; a literal ``--`` is honoured too.
    Unknown arguments are ignored because under ``AppTest`` ``sys.argv`` is the test runner's own.
    """
    args = list(argv[1:])
    if "--" in args:
        args = args[args.index("--") + 1:]
    # No abbreviations: a test runner's ``--exp...`` flag must not be taken for ``--experiment``.
    parser = argparse.ArgumentParser(prog="dashboard/app.py", allow_abbrev=False, add_help=False)
    parser.add_argument("--tracking-uri",
                        default=os.environ.get("MLFLOW_TRACKING_URI") or results.DEFAULT_TRACKING_URI)
    parser.add_argument("--experiment", default=results.DEFAULT_EXPERIMENT)
    known, _ = parser.parse_known_args(args)
    return known


def plot_axes(objectives: Sequence[str]) -> tuple[str, str]:
    """(x, y): the two objectives, the accuracy-like (maximised) one up the y axis, when they form a 2-D
    front; otherwise the project's default trade-off."""
    if len(objectives) == 2 and all(m in METRICS for m in objectives):
        maximised = [m for m in objectives if direction(m) == "max"]
        if len(maximised) == 1:
            y = maximised[0]
            x = next(m for m in objectives if m != y)
            return x, y
    return FALLBACK_AXES


def pareto_front(df: pd.DataFrame, objectives: Sequence[str]) -> tuple[pd.DataFrame, str | None]:
    """The finished trials on the front, or an empty frame and the reason there is none."""
    none = df.iloc[0:0]
    unknown = [m for m in objectives if m not in METRICS]
    if unknown:
        return none, f"the search lists objectives unknown to space.metrics: {', '.join(unknown)}"
    finished = df[df.status == results.STATUS_FINISHED]
    if finished.empty:
        return none, ("no finished trials yet, so there is no Pareto front (pruned and failed trials never "
                      "qualify: their metrics are not those of a full trial)")
    missing = [m for m in objectives if m not in finished or finished[m].isna().all()]
    if missing:
        return none, f"no finished trial has logged {', '.join(missing)}, so there is no Pareto front"
    return results.pareto(df, list(objectives)), None


def most_accurate(front: pd.DataFrame, metric: str) -> str | None:
    best = results.best_trial(front, [metric])
    return None if best is None else str(best["run_id"])


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plottable(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Rows with a value on both axes: a running, failed or pruned trial may lack either."""
    if x not in df or y not in df:
        return pd.Series(False, index=df.index)
    return df[x].map(_finite) & df[y].map(_finite)


def pareto_figure(df: pd.DataFrame, front: pd.DataFrame, x: str, y: str, staircase: bool) -> go.Figure:
    """Every trial with both values, by status, and the front on top. ``staircase`` joins the front with a
    step line; it is only meaningful when (x, y) are exactly the objectives the front was computed on."""
    fig = go.Figure()
    plotted = df[plottable(df, x, y)]
    # Baselines (search.baselines) are references, drawn apart and never as candidates of the front.
    is_baseline = plotted.get("phase", pd.Series("", index=plotted.index)) == results.BASELINE
    refs, plotted = plotted[is_baseline], plotted[~is_baseline]
    statuses = list(STATUS_STYLE) + sorted(set(plotted.status) - set(STATUS_STYLE))
    hover = "%{text}<br>%{customdata}<br>" + f"{label(x)}: %{{x}}<br>{label(y)}: %{{y}}"
    for status in statuses:
        part = plotted[plotted.status == status]
        if part.empty:
            continue
        colour, symbol = STATUS_STYLE.get(status, ("#9467bd", "square"))
        fig.add_trace(go.Scatter(
            x=part[x], y=part[y], mode="markers", name=status, text=part.trial, customdata=part.methods,
            marker={"color": colour, "symbol": symbol, "size": 9},
            hovertemplate=hover + f"<extra>{status}</extra>"))
    for _, ref in refs.iterrows():
        fig.add_trace(go.Scatter(
            x=[ref[x]], y=[ref[y]], mode="markers", name=str(ref.methods), text=[ref.trial],
            customdata=[ref.methods], marker={"color": "black", "symbol": "triangle-up", "size": 13},
            hovertemplate=hover + "<extra>baseline</extra>"))
    if not front.empty:
        # Sorted along x so the step line walks the front; "hv" draws the boundary of the dominated region
        # for x minimised and y maximised, which plot_axes guarantees.
        line = front.sort_values(x, kind="stable")
        fig.add_trace(go.Scatter(
            x=line[x], y=line[y], mode="lines+markers" if staircase else "markers", name="Pareto front",
            line={"shape": "hv", "color": "#2ca02c", "width": 2}, text=line.trial, customdata=line.methods,
            marker={"symbol": "star", "size": 16, "color": "#2ca02c", "line": {"color": "black", "width": 1}},
            hovertemplate=hover + "<extra>Pareto front</extra>"))
    log_x = not plotted.empty and bool((plotted[x] > 0).all())  # log axes cannot show zero
    fig.update_layout(
        xaxis={"title": {"text": label(x)}, "type": "log" if log_x else "linear"},
        yaxis={"title": {"text": label(y)}}, legend={"title": {"text": "status"}},
        margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


def trial_table(df: pd.DataFrame, front: pd.DataFrame) -> pd.DataFrame:
    columns = ["trial", "status", "methods"] + [m for m in TABLE_FORMATS if m in df] + ["run_id"]
    table = df[columns].copy()
    table.insert(0, PARETO_COLUMN, df.run_id.isin(front.run_id))
    return table


def _column_config(table: pd.DataFrame) -> dict[str, Any]:
    config: dict[str, Any] = {PARETO_COLUMN: st.column_config.CheckboxColumn(
        PARETO_COLUMN, help="finished and not dominated on the search's objectives")}
    for m, fmt in TABLE_FORMATS.items():
        if m in table:
            config[m] = st.column_config.NumberColumn(label(m), format=fmt)
    return config


def show_counts(df: pd.DataFrame) -> None:
    counts = df.status.value_counts()
    statuses = list(STATUS_STYLE) + sorted(set(counts.index) - set(STATUS_STYLE))
    for col, status in zip(st.columns(len(statuses)), statuses, strict=True):
        col.metric(status, int(counts.get(status, 0)))


def export_command(run_id: str, uri: str, experiment: str) -> str:
    """``python -m search.export`` for this trial; the store is named only where it is not export's default
    (export itself also reads MLFLOW_TRACKING_URI, which the shell running it may not have)."""
    command = f"python -m search.export --run {run_id} -o {EXPORT_NAME}"
    if uri != results.DEFAULT_TRACKING_URI:
        command += f" --tracking-uri {shlex.quote(uri)}"
    if experiment != results.DEFAULT_EXPERIMENT:
        command += f" --experiment {shlex.quote(experiment)}"
    return command


def show_trial(c: Any, uri: str, experiment: str, df: pd.DataFrame, front: pd.DataFrame, search_id: str,
               y: str) -> None:
    st.subheader("Trial config")
    on_front = set(front.run_id)
    names = dict(zip(df.run_id, df.trial, strict=True))
    rows = df.set_index("run_id")
    options = list(df.run_id)
    default = most_accurate(front, y) or options[0]

    def describe(run_id: str) -> str:
        row = rows.loc[run_id]
        star = "  ★ Pareto" if run_id in on_front else ""
        return f"{row.trial} · {row.status} · {row.methods or 'no summary'}{star}"

    # Keyed per search so switching searches starts from that search's own default.
    run_id = st.selectbox("Trial", options, index=options.index(default), format_func=describe,
                          key=f"trial-{search_id}")
    status = rows.loc[run_id].status
    if status != results.STATUS_FINISHED:
        st.caption(f"{names[run_id]} is {status}: its metrics are not those of a full trial.")
    try:
        text = results.trial_config_text(c, run_id)
    except results.ResultsError as exc:
        st.warning(str(exc))
        return
    try:
        TrialConfig.from_yaml(text, where=f"{names[run_id]} {results.CONFIG_ARTIFACT}")
    except SpaceError as exc:
        # Exporting it would only move the failure to `python -m trials.train`; show why instead.
        st.warning(f"not a valid trial config, so it is not offered for export:\n\n{exc}")
        st.code(text, language="yaml")
        return
    st.code(text, language="yaml")
    st.download_button(f"Download {EXPORT_NAME}", data=text, file_name=EXPORT_NAME, mime="text/yaml",
                       on_click="ignore", key=f"download-{run_id}")
    st.caption("The same from the command line:")
    st.code(export_command(run_id, uri, experiment), language="bash")


def main() -> None:
    st.set_page_config(page_title="mamba-peft-search", layout="wide")
    defaults = launch_defaults(sys.argv)
    with st.sidebar:
        st.header("Results store")
        uri = st.text_input("MLflow tracking URI", value=defaults.tracking_uri, key="tracking_uri").strip()
        experiment = st.text_input("Experiment", value=defaults.experiment, key="experiment").strip()
        st.button("Refresh", help="re-read the store, e.g. while a search is running")

    if not uri or not experiment:
        # An empty URI would make MLflow fall back to (and create) ./mlflow.db.
        st.info("enter an MLflow tracking URI and an experiment name in the sidebar")
        return
    try:
        c = results.client(uri)
        found = results.searches(c, experiment)
    except results.ResultsError as exc:
        st.warning(str(exc))
        return
    except MlflowException as exc:
        st.error(f"cannot read the MLflow store at {mask(uri)}: {mask(exc.message)}")
        return
    if found.empty:
        st.info(f"experiment {experiment!r} at {mask(uri)} has no searches yet; start one with "
                "`python -m search.run space.yaml`")
        return

    searches = found.set_index("run_id")
    search_id = st.sidebar.selectbox(
        "Search (newest first)", list(found.run_id), key="search",
        format_func=lambda r: f"{searches.loc[r, 'name']} · {searches.loc[r, 'status'] or 'unknown'} · "
                              f"{searches.loc[r, 'start_time']:%Y-%m-%d %H:%M}")
    info = searches.loc[search_id]
    objectives = list(info.objectives)
    st.title(f"Search {info['name']}")
    described = ", ".join(f"{label(m)} ({direction(m)})" if m in METRICS else m for m in objectives)
    st.caption(f"run {search_id} · {info.status or 'unknown status'} · objectives: {described}")

    df = results.trials(c, experiment, search_id)
    if df.empty:
        st.info(f"search {info['name']!r} has no trials logged yet")
        return

    show_counts(df)
    front, why_none = pareto_front(df, objectives)
    if why_none:
        st.warning(f"search {info['name']!r}: {why_none}")

    x, y = plot_axes(objectives)
    staircase = set(objectives) == {x, y}
    st.subheader("Pareto front")
    st.plotly_chart(pareto_figure(df, front, x, y, staircase), key="pareto")
    if not staircase and not front.empty:
        st.caption(f"The front is over all of {', '.join(objectives)}; this plane shows only "
                   f"{x} and {y}, so its points need not form a staircase here.")
    unplotted = int((~plottable(df, x, y)).sum())
    if unplotted:
        st.caption(f"{unplotted} trial(s) have not logged both {x} and {y} and are not plotted.")

    st.subheader("Trials")
    table = trial_table(df, front)
    st.dataframe(table, hide_index=True, column_config=_column_config(table), key="trials")

    show_trial(c, uri, experiment, df, front, search_id, y)


if __name__ == "__main__":
    main()
