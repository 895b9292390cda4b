"""Streamlit dashboard over the searches stored in MLflow: the Pareto front, the search's progress, what each
PEFT method contributes, every trial, and the config of the trial to keep, ready to download and train.

It only reads what ``search.tracking`` logged (through ``search.results``) and the search's Optuna study (opened
read-only); it never trains or writes, so nothing here may import ray or torch. Launch it with

    streamlit run dashboard/app.py -- --tracking-uri sqlite:///runs/mlflow.db --experiment mamba-peft-search

or with no arguments to read ``MLFLOW_TRACKING_URI`` (else ``search.results.DEFAULT_TRACKING_URI``). The URI may
be a sqlite file, a PostgreSQL URL (``postgresql+psycopg2://...``) or an MLflow server (``http://host:5000``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import pandas as pd
import streamlit as st

# A tracking server that does not answer must be a message within seconds, not minutes of MLflow's retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

from dashboard import data, views  # noqa: E402
from search import results  # noqa: E402
from space.metrics import METRICS, direction, label  # noqa: E402
from space.secrets import mask  # noqa: E402

REFRESH = "15s"  # how often the views re-read the store while the search runs
VIEWS = ("Front", "Progress", "Methods", "Trials", "Export")
# Re-exported for callers and tests that knew them here.
export_command, pareto_figure = views.export_command, views.pareto_figure


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


def search_states(c, found: pd.DataFrame, experiment: str, now: pd.Timestamp) -> dict[str, data.SearchState]:
    """Every search's state (``data.search_state``); only a search whose tag and run both say running needs its
    trials read to tell a live one from a stale one."""
    states = {}
    for _, row in found.iterrows():
        last = None
        if row.status in ("", results.STATUS_RUNNING) and row.run_status == "RUNNING":
            df = results.trials(c, experiment, row.run_id, detail=True)
            last = data.last_event(row.start_time, df, data.reported_times(c, row.run_id, df, list(METRICS)))
        states[row.run_id] = data.search_state(row.status or results.STATUS_RUNNING, row.run_status, last, now)
    return states


def open_store(uri: str, experiment: str) -> tuple[object, pd.DataFrame] | None:
    """The MLflow client and the experiment's searches, or None after a message saying why not."""
    try:
        data.check_database(uri)
        c = results.client(uri)
        return c, results.searches(c, experiment)
    except results.ResultsError as exc:
        st.warning(str(exc))
    except Exception as exc:  # any store failure (unreachable server or database, bad scheme) is a message
        message = getattr(exc, "message", None) or str(exc)
        st.error(f"cannot read the MLflow store at {mask(uri)}: {mask(str(message))[:1000]}")
    return None


def main() -> None:
    st.set_page_config(page_title="mamba-peft-search", layout="wide")
    defaults = launch_defaults(sys.argv)
    with st.sidebar:
        st.header("Results store")
        uri = st.text_input("MLflow tracking URI", value=defaults.tracking_uri, key="tracking_uri",
                            help="a sqlite file (sqlite:///runs/mlflow.db), a PostgreSQL URL "
                                 "(postgresql+psycopg2://user@host/db) or an MLflow server (http://host:5000)").strip()
        experiment = st.text_input("Experiment", value=defaults.experiment, key="experiment").strip()
        st.button("Refresh", help="re-read the store")

    if not uri or not experiment:
        # An empty URI would make MLflow fall back to (and create) ./mlflow.db.
        st.info("enter an MLflow tracking URI and an experiment name in the sidebar")
        return
    opened = open_store(uri, experiment)
    if opened is None:
        return
    c, found = opened
    if found.empty:
        st.info(f"experiment {experiment!r} at {mask(uri)} has no searches yet; start one with "
                "`python -m search.run space.yaml`")
        return
    try:
        states = search_states(c, found, experiment, pd.Timestamp.now("UTC").tz_localize(None))
    except Exception as exc:
        st.error(f"cannot read the searches at {mask(uri)}: {mask(str(exc))[:1000]}")
        return
    searches = found.set_index("run_id")
    search_id = str(st.sidebar.selectbox(
        "Search (newest first)", list(found.run_id), key="search",
        format_func=lambda r: f"{searches.loc[r, 'name']} · {states[r].state} · "
                              f"{searches.loc[r, 'start_time']:%Y-%m-%d %H:%M}"))
    storage = st.sidebar.text_input(
        "Optuna storage (optional)", value=data.optuna_storage_default(uri), key="optuna_storage",
        help="where the search's Optuna study is, for parameter importances; opened read-only. Without it the "
             "importances come from the MLflow params.").strip()
    live = states[search_id].live
    st.fragment(show_search, run_every=REFRESH if live else None)(c, uri, experiment, search_id, storage, live)


def show_search(c, uri: str, experiment: str, search_id: str, storage: str, was_live: bool) -> None:
    """One search's header and views; re-run by itself every ``REFRESH`` while the search is live."""
    try:
        info = results.search_info(c, experiment, search_id)
        df = results.trials(c, experiment, search_id, detail=True)
        now = pd.Timestamp.now("UTC").tz_localize(None)
        last = data.last_event(info["start_time"], df, data.reported_times(c, search_id, df, list(METRICS)))
    except Exception as exc:
        st.error(f"cannot read search {search_id} at {mask(uri)}: {mask(str(exc))[:1000]}")
        return
    state = data.search_state(info["status"] or results.STATUS_RUNNING, info["run_status"], last, now)
    if state.live != was_live:  # it ended (or came back): the whole page changes, refreshing or not
        st.rerun(scope="app")
    objectives = list(info["objectives"])
    st.title(f"Search {info['name']}")
    described = ", ".join(f"{label(m)} ({direction(m)})" if m in METRICS else m for m in objectives)
    st.caption(f"run {search_id} · {state.state} · objectives: {described}")
    if state.state in (data.STATE_STALE, data.STATE_KILLED):
        st.warning(f"search {info['name']!r} is {state.state}, not running: {state.note}. What it logged is shown "
                   "as it is.")
    if df.empty:
        st.info(f"search {info['name']!r} has no trials logged yet"
                + (f"; this page refreshes every {REFRESH} while it runs" if state.live else ""))
        return
    if state.live:
        running = int((df.status == results.STATUS_RUNNING).sum())
        st.info(f"search {info['name']!r} is still running ({running} trial(s) training, {len(df)} so far); this "
                f"page refreshes every {REFRESH}.")
    failed = df[df.status == results.STATUS_FAILED]
    if len(failed) == len(df):
        reasons = sorted({str(e) for e in failed.get("error", pd.Series(dtype=str)) if str(e)})
        st.error(f"all {len(df)} trials of search {info['name']!r} failed, so there is nothing to compare"
                 + (": " + "; ".join(reasons[:3]) if reasons else "")
                 + ". Each trial's MLflow run holds its traceback as error.txt.")
    views.show_counts(df)
    front, why_none = views.pareto_front(df, objectives)
    if why_none:
        st.warning(f"search {info['name']!r}: {why_none}")
    s = views.Search(c, uri, experiment, search_id, str(info["name"]), objectives, df, front, storage)
    for tab, (name, view) in zip(st.tabs(list(VIEWS)), [
            ("Front", views.front_view), ("Progress", views.progress_view), ("Methods", views.methods_view),
            ("Trials", views.trials_view), ("Export", views.export_view)], strict=True):
        with tab:
            try:
                view(s)
            except Exception as exc:  # one view's failure is a message, and the others still show
                st.error(f"the {name} view could not be drawn: {type(exc).__name__}: {mask(str(exc))[:1000]}")


if __name__ == "__main__":
    main()
