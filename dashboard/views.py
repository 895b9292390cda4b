"""The dashboard's views of one search: front, progress, methods, trials and export. Each takes a ``Search``
(what the store holds about it) and draws with Streamlit; what they compute lives in ``dashboard.data``."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data
from search import results
from space.config import SpaceError, TrialConfig
from space.metrics import METRICS, direction, label
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
FAMILY_COLOURS = ("#1f77b4", "#ff7f0e", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                  "#7f7f7f")
FRONT_COLOUR = "#2ca02c"
TRIALS_META = "trials"  # the ``meta`` of the front chart's trial traces (not the front line, not baselines)
COLOUR_FAMILY, COLOUR_STATUS = "method family", "status"
TABLE_FORMATS = {  # metric shown in the trial table (where any trial logged it): its number format
    "val_accuracy": "%.3f", "test_accuracy": "%.3f", "trainable_params": "%.0f", "trainable_pct": "%.3f",
    "train_seconds": "%.1f", "peak_memory_mb": "%.0f"}
PARETO_COLUMN = "Pareto"
EXPORT_NAME = "best.yaml"
PICK_BEST, PICK_KNEE, PICK_BUDGET, PICK_TRIAL = "best", "knee", "budget", "a trial"


@dataclass(frozen=True)
class Search:
    """One search as the store holds it, handed to every view."""

    client: Any
    uri: str
    experiment: str
    run_id: str
    name: str
    objectives: list[str]
    trials: pd.DataFrame  # results.trials(..., detail=True)
    front: pd.DataFrame  # the finished trials on the front of ``objectives``
    optuna_storage: str

    @property
    def quality(self) -> str:
        return data.objective_names(self.objectives)[0]

    def run_ids(self, names: Sequence[str]) -> dict[str, str]:
        rows = self.trials.set_index("trial")
        return {n: str(rows.loc[n, "run_id"]) for n in names}


# -- front ------------------------------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plottable(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Rows with a value on both axes: a running, failed or pruned trial may lack either."""
    if x not in df or y not in df:
        return pd.Series(False, index=df.index)
    return df[x].map(_finite) & df[y].map(_finite)


def hover_config(row: pd.Series) -> str:
    """A trial's sampled configuration for the hover: its methods and every param it logged."""
    params = [f"{k.removeprefix(data.PARAM)}={row[k]}" for k in row.index
              if k.startswith(data.PARAM) and k != f"{data.PARAM}seed" and not pd.isna(row[k])]
    lines = [str(row.get("methods") or "no methods")]
    if str(row.get("reevaluates") or ""):  # a re-evaluation seed sits beside the trial it repeats
        lines[0] += f" (seed {row.get('param.seed', '?')}, re-evaluating {row.reevaluates})"
    lines += [", ".join(params[i:i + 3]) for i in range(0, len(params), 3)]
    return "<br>".join(lines)


def pareto_figure(df: pd.DataFrame, front: pd.DataFrame, x: str, y: str, colour_by: str = COLOUR_FAMILY,
                  base: float | None = None) -> go.Figure:
    """Every trial with both values, coloured by method family (marker by status) or by status, the
    baselines as black triangles, and the front as a step line. ``base`` (the model's parameter count) adds a
    top axis in % of the model when x is the trainable-parameter count."""
    fig = go.Figure()
    plotted = df[plottable(df, x, y)]
    # Baselines (search.baselines) are references, drawn apart and never as candidates of the front.
    is_baseline = plotted.get("phase", pd.Series("", index=plotted.index)) == results.BASELINE
    refs, plotted = plotted[is_baseline], plotted[~is_baseline]
    hover = ("<b>%{text}</b> · %{customdata[0]}<br>%{customdata[1]}<br>" + f"{label(x)}: %{{x}}<br>"
             f"{label(y)}: %{{y}}")
    if colour_by == COLOUR_STATUS:
        key = plotted.status
        order = list(STATUS_STYLE) + sorted(set(key) - set(STATUS_STYLE))
        colours = {s: STATUS_STYLE.get(s, ("#9467bd", ""))[0] for s in order}
    else:
        key = plotted.methods.map(lambda s: data.trial_family(str(s)))
        order = sorted(set(key), key=lambda f: (f.count("+"), f))
        colours = {f: FAMILY_COLOURS[i % len(FAMILY_COLOURS)] for i, f in enumerate(order)}
    for group in order:
        part = plotted[key == group]
        if part.empty:
            continue
        fig.add_trace(go.Scatter(
            x=part[x], y=part[y], mode="markers", name=group, text=part.trial, meta=TRIALS_META,
            customdata=[[s, hover_config(r)] for s, (_, r) in zip(part.status, part.iterrows(), strict=True)],
            marker={"color": colours[group], "size": 10,
                    "symbol": [STATUS_STYLE.get(s, ("", "square"))[1] for s in part.status]},
            hovertemplate=hover + f"<extra>{group}</extra>"))
    for _, ref in refs.iterrows():
        fig.add_trace(go.Scatter(
            x=[ref[x]], y=[ref[y]], mode="markers", name=str(ref.methods), text=[ref.trial],
            customdata=[[ref.status, str(ref.methods)]], marker={"color": "black", "symbol": "triangle-up",
                                                                 "size": 13},
            hovertemplate=hover + "<extra>baseline</extra>"))
    if not front.empty:
        # Sorted along x so the step line walks the front: "hv" draws the boundary of the dominated region for
        # x minimised, whichever way y goes.
        line = front.sort_values(x, kind="stable")
        fig.add_trace(go.Scatter(
            x=line[x], y=line[y], mode="lines+markers", name="Pareto front",
            line={"shape": "hv", "color": FRONT_COLOUR, "width": 2}, text=line.trial,
            customdata=[[r.status, hover_config(r)] for _, r in line.iterrows()],
            marker={"symbol": "star", "size": 16, "color": FRONT_COLOUR, "line": {"color": "black", "width": 1}},
            hovertemplate=hover + "<extra>Pareto front</extra>"))
    every = pd.concat([plotted[x], refs[x]]).astype(float) if x in df else pd.Series(dtype=float)
    log_x = not every.empty and bool((every > 0).all())  # log axes cannot show zero
    fig.update_layout(
        xaxis={"title": {"text": label(x)}, "type": "log" if log_x else "linear"},
        yaxis={"title": {"text": label(y)}},
        legend={"title": {"text": colour_by}}, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    if log_x and base and x == "trainable_params":
        _percent_axis(fig, every, base)
    return fig


def _percent_axis(fig: go.Figure, xs: pd.Series, base: float) -> None:
    """A top axis in % of the model, on the same log scale as the count below it."""
    low, high = math.log10(float(xs.min())) - 0.15, math.log10(float(xs.max())) + 0.15
    shift = math.log10(100.0 / base)
    ticks = [m * 10.0 ** e for e in range(-6, 3) for m in (1, 2, 5)
             if low + shift <= math.log10(m * 10.0 ** e) <= high + shift]
    fig.update_layout(xaxis={"range": [low, high]}, xaxis2={
        "title": {"text": "% of the model"}, "type": "log", "overlaying": "x", "side": "top",
        "range": [low + shift, high + shift], "showgrid": False, "tickvals": ticks,
        "ticktext": [f"{t:g}%" for t in ticks]})
    # An axis is drawn only with a trace on it: an invisible one spanning the range.
    fig.add_trace(go.Scatter(x=[10 ** (low + shift), 10 ** (high + shift)], y=[None, None], xaxis="x2",
                             mode="markers", showlegend=False, hoverinfo="skip", name="% of the model"))


def pareto_front(df: pd.DataFrame, objectives: Sequence[str]) -> tuple[pd.DataFrame, str | None]:
    """The finished trials on the front, or an empty frame and the reason there is none."""
    none = df.iloc[0:0]
    unknown = [m for m in objectives if m not in METRICS]
    if unknown:
        return none, f"the search lists objectives unknown to space.metrics: {', '.join(unknown)}"
    done = data.finished(df)
    if done.empty:
        return none, ("no finished trials yet, so there is no Pareto front (pruned and failed trials never "
                      "qualify: their metrics are not those of a full trial)")
    missing = [m for m in objectives if m not in done or done[m].isna().all()]
    if missing:
        return none, f"no finished trial has logged {', '.join(missing)}, so there is no Pareto front"
    return results.pareto(df, list(objectives)), None


def plot_axes(objectives: Sequence[str]) -> tuple[str, str]:
    """(x, y): the two objectives, the maximised one up the y axis, when they form a 2-D front; otherwise the
    project's default trade-off."""
    if len(objectives) == 2 and all(m in METRICS for m in objectives):
        maximised = [m for m in objectives if direction(m) == "max"]
        if len(maximised) == 1:
            return next(m for m in objectives if m != maximised[0]), maximised[0]
    return "trainable_params", "val_accuracy"


def _choose(column: Any, title: str, options: list[str], default: str, key: str) -> str:
    if default not in options:
        options = [default, *options]
    return str(column.selectbox(title, options, index=options.index(default), format_func=label, key=key))


def front_view(s: Search) -> None:
    df = s.trials
    x0, y0 = plot_axes(s.objectives)
    metrics = data.axis_metrics(df)
    c1, c2, c3 = st.columns(3)
    y = _choose(c1, "Quality (y)", data.quality_axes(metrics), y0, f"front-y-{s.run_id}")
    x = _choose(c2, "Cost (x)", data.cost_axes(metrics), x0, f"front-x-{s.run_id}")
    colour_by = str(c3.radio("Colour by", [COLOUR_FAMILY, COLOUR_STATUS], horizontal=True,
                             key=f"front-colour-{s.run_id}"))
    present = [st_ for st_ in STATUS_STYLE if st_ in set(df.status)] + sorted(set(df.status) - set(STATUS_STYLE))
    shown = st.multiselect("Show trials that are", present, default=present, key=f"front-status-{s.run_id}",
                           help="pruned, failed and rejected (over the size budget) trials can be hidden")
    if set(s.objectives) == {x, y}:
        front = s.front
    else:
        front = results.pareto(df, [x, y]) if x in METRICS and y in METRICS else df.iloc[0:0]
        st.caption(f"The front drawn is that of {label(y)} against {label(x)}; the search's own front is over "
                   f"{', '.join(s.objectives)}.")
    visible = df[df.status.isin(shown)]
    st.plotly_chart(pareto_figure(visible, front, x, y, colour_by, data.base_params(df)), key="pareto")
    unplotted = int((~plottable(visible, x, y)).sum())
    if unplotted:
        st.caption(f"{unplotted} shown trial(s) have not logged both {x} and {y} and are not plotted.")
    if not front.empty:
        st.caption("Stars joined by the step line: the Pareto front (finished trials only). Marker shapes are the "
                   "trial states; hover a point for its configuration.")


# -- progress ---------------------------------------------------------------------------------------------------
def show_counts(df: pd.DataFrame) -> None:
    counts = df.status.value_counts() if not df.empty else pd.Series(dtype=int)
    statuses = list(STATUS_STYLE) + sorted(set(counts.index) - set(STATUS_STYLE))
    for col, status in zip(st.columns(len(statuses)), statuses, strict=True):
        col.metric(status, int(counts.get(status, 0)))


def _line(frame: pd.DataFrame, x: str, y: str, x_title: str, y_title: str, colour: str | None = None) -> go.Figure:
    fig = go.Figure()
    groups = frame.groupby(colour, sort=False) if colour else [(y_title, frame)]
    for name, part in groups:
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers", name=str(name)))
    fig.update_layout(xaxis={"title": {"text": x_title}}, yaxis={"title": {"text": y_title}},
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, showlegend=colour is not None)
    return fig


def progress_view(s: Search) -> None:
    hv = data.history(s.client, s.run_id, "hypervolume")
    left, right = st.columns(2)
    with left:
        st.markdown("**Hypervolume** after each completed trial")
        if hv.empty:
            st.info("no hypervolume logged yet: the search logs it after each completed trial")
        else:
            st.plotly_chart(_line(hv, "step", "value", "completed trials", "hypervolume"), key="hypervolume")
    with right:
        quality = s.quality
        st.markdown(f"**Best {label(quality)}** over completed trials")
        best = data.best_so_far(s.trials, quality)
        if best.empty or best.best.isna().all():
            st.info(f"no finished trial has logged {quality} yet")
        else:
            st.plotly_chart(_line(best, "completed", "best", "completed trials", label(quality)), key="best")
    summary = s.client.get_run(s.run_id).data.metrics
    if "steps_saved_by_pruning" in summary:
        st.caption(f"Pruning saved {summary['steps_saved_by_pruning']:,.0f} training steps.")


# -- methods ----------------------------------------------------------------------------------------------------
def _importances(s: Search) -> tuple[pd.DataFrame | None, str]:
    """Importances from the search's Optuna study where it can be reached, else from a study rebuilt from the
    MLflow params; (None, why) when there are too few trials."""
    done = data.finished(data.searched(s.trials))
    if len(done) < 2:
        return None, "parameter importances need at least two finished trials"
    objectives = [m for m in s.objectives if m in done]
    if s.optuna_storage:
        try:
            studies = data.open_studies(s.optuna_storage,
                                        data.study_name(s.client, s.run_id, s.name))
            usable = [st_ for st_ in studies if data.complete_values(st_) >= 2]
            if usable:
                study = usable[-1]
                return data.importances(study, s.objectives), f"from the Optuna study {study.study_name!r}"
        except Exception as exc:  # unreachable or unreadable: the MLflow params serve
            note = f"the Optuna study could not be read ({mask(str(exc))[:200]}); "
        else:
            note = "the search's Optuna study was not found in that storage; "
    else:
        note = ""
    if not data.param_columns(done):
        return None, "no hyperparameter varied between the finished trials"
    try:
        return data.importances(data.rebuilt_study(s.trials, objectives), objectives), \
            note + "from the finished trials' MLflow params (a study rebuilt in memory)"
    except (ValueError, RuntimeError) as exc:
        return None, f"parameter importances could not be computed: {exc}"


def _titled_table(title: str, frame: pd.DataFrame, empty: str, key: str) -> bool:
    """``frame`` under ``title``, or the ``empty`` message; whether there was a table."""
    st.markdown(title)
    if frame.empty:
        st.info(empty)
        return False
    st.dataframe(frame, hide_index=True, key=key)
    return True


def methods_view(s: Search) -> None:
    objectives = [m for m in s.objectives if m in s.trials]
    marginals = data.method_marginals(s.trials, objectives)
    quality = s.quality
    if _titled_table("**Per method**: finished trials with and without it (a marginal effect, not a controlled "
                     "one)", marginals, "no finished trial used a PEFT method yet", "method-marginals") \
            and f"{quality} with" in marginals:
        fig = go.Figure([go.Bar(x=marginals.method, y=marginals[f"{quality} {side}"], name=f"{side} it")
                         for side in ("with", "without")])
        fig.update_layout(barmode="group", yaxis={"title": {"text": label(quality)}},
                          margin={"l": 10, "r": 10, "t": 30, "b": 10})
        st.plotly_chart(fig, key="method-effect")
    st.markdown("**Parameter importances** per objective (Optuna's fANOVA)")
    table, source = _importances(s)
    if table is None:
        st.info(source)
    else:
        st.caption(source)
        st.dataframe(table.reset_index(), hide_index=True, key="importances")
    _titled_table("**Per hyperparameter value**: finished trials and their mean objectives",
                  data.param_marginals(s.trials, objectives), "no hyperparameter varied between the finished trials",
                  "param-marginals")


# -- trials -----------------------------------------------------------------------------------------------------
def trial_table(df: pd.DataFrame, front: pd.DataFrame) -> pd.DataFrame:
    columns = ["trial", "status", "phase", "methods"] + [m for m in TABLE_FORMATS if m in df] + ["run_id"]
    table = df[[c for c in columns if c in df]].copy()
    table.insert(0, PARETO_COLUMN, df.run_id.isin(front.run_id))
    table.insert(4, "family", df.methods.map(lambda m: data.trial_family(str(m))))
    return table


def _column_config(table: pd.DataFrame) -> dict[str, Any]:
    config: dict[str, Any] = {PARETO_COLUMN: st.column_config.CheckboxColumn(
        PARETO_COLUMN, help="finished and not dominated on the search's objectives")}
    for m, fmt in TABLE_FORMATS.items():
        if m in table:
            config[m] = st.column_config.NumberColumn(label(m), format=fmt)
    return config


def filtered(df: pd.DataFrame, statuses: Sequence[str], methods: Sequence[str], text: str) -> pd.DataFrame:
    """Trials in one of ``statuses``, using every one of ``methods``, whose name or summary contains ``text``."""
    keep = df.status.isin(statuses)
    for method in methods:
        keep &= df.methods.map(lambda s, m=method: m in data.method_names(str(s)))
    if text:
        keep &= df.trial.str.contains(text, case=False, regex=False) | df.methods.astype(str).str.contains(
            text, case=False, regex=False)
    return df[keep]


def trials_view(s: Search) -> None:
    df = s.trials
    c1, c2, c3 = st.columns(3)
    present = sorted(set(df.status), key=lambda x: list(STATUS_STYLE).index(x) if x in STATUS_STYLE else 99)
    statuses = c1.multiselect("Status", present, default=present, key=f"filter-status-{s.run_id}")
    methods = c2.multiselect("Uses every one of", data.method_columns(df), key=f"filter-methods-{s.run_id}")
    text = c3.text_input("Name or methods contain", key=f"filter-text-{s.run_id}").strip()
    table = trial_table(filtered(df, statuses, methods, text), s.front)
    st.caption(f"{len(table)} of {len(df)} trials; click a column header to sort.")
    st.dataframe(table, hide_index=True, column_config=_column_config(table), key="trials")
    trial_page(s)
    compare(s)


def _describe(s: Search) -> Any:
    rows = s.trials.set_index("run_id")
    on_front = set(s.front.run_id)

    def describe(run_id: str) -> str:
        row = rows.loc[run_id]
        star = "  ★ Pareto" if run_id in on_front else ""
        return f"{row.trial} · {row.status} · {row.methods or 'no summary'}{star}"

    return describe


def most_accurate(front: pd.DataFrame, objectives: Sequence[str]) -> str | None:
    best = results.best_trial(front, list(objectives))
    return None if best is None else str(best["run_id"])


def trial_page(s: Search) -> None:
    st.subheader("Trial")
    options = list(s.trials.run_id)
    default = most_accurate(s.front, s.objectives) or options[0]
    run_id = st.selectbox("Trial", options, index=options.index(default), format_func=_describe(s),
                          key=f"trial-page-{s.run_id}")
    row = s.trials.set_index("run_id").loc[run_id]
    if row.status != results.STATUS_FINISHED:
        st.caption(f"{row.trial} is {row.status}: its metrics are not those of a full trial.")
    if str(row.get("error") or ""):
        st.error(f"{row.trial} failed: {row.error}")
    left, right = st.columns(2)
    with left:
        st.markdown("**Timings and memory**")
        st.dataframe(timings(row), hide_index=True, key=f"timings-{run_id}")
        try:
            st.code(results.trial_config_text(s.client, run_id), language="yaml")
        except results.ResultsError as exc:
            st.warning(str(exc))
    with right:
        learning_curves(s, {str(row.trial): run_id}, key=f"curve-{run_id}")


def timings(row: pd.Series) -> pd.DataFrame:
    """When a trial ran, for how long, how fast, with how much memory, on which device and which kernel path."""
    items: list[tuple[str, str]] = []
    start, end = row.get("start_time"), row.get("end_time")
    if start is not None and not pd.isna(start):
        items.append(("started", f"{start:%Y-%m-%d %H:%M:%S}"))
    if end is not None and not pd.isna(end):
        items.append(("ended", f"{end:%Y-%m-%d %H:%M:%S}"))
        items.append(("wall time", f"{(end - start).total_seconds():.1f} s"))
    seconds, steps = row.get("train_seconds"), row.get("steps_done")
    if _finite(seconds):
        items.append(("training time", f"{seconds:.1f} s"))
    if _finite(steps):
        items.append(("steps trained", f"{steps:,.0f}"))
        if _finite(seconds) and steps:
            items.append(("seconds per step", f"{seconds / steps:.3f}"))
    if _finite(row.get("peak_memory_mb")):
        items.append(("peak memory", f"{row.peak_memory_mb:,.0f} MB"))
    for key, name in (("device", "device"), ("kernel", "kernel path")):
        if isinstance(row.get(key), str) and row.get(key):
            items.append((name, str(row[key])))
    if not items:
        items.append(("timings", "none logged yet"))
    return pd.DataFrame(items, columns=["measure", "value"])


def learning_curves(s: Search, runs: dict[str, str], key: str) -> None:
    """The quality metric at every rung (and the training loss) for ``runs``, overlaid."""
    for metric in (s.quality, "train_loss"):
        frame = data.curves(s.client, runs, metric)
        if frame.empty:
            st.caption(f"no {label(metric)} curve logged")
            continue
        st.plotly_chart(_line(frame, "step", "value", "training step", label(metric), colour="trial"),
                        key=f"{key}-{metric}")


def compare(s: Search) -> None:
    st.subheader("Compare trials")
    names = list(s.trials.trial)
    chosen = st.multiselect("Trials side by side", names, key=f"compare-{s.run_id}",
                            help="two or more: their configs as a diff and their curves overlaid")
    if len(chosen) < 2:
        st.caption("choose two or more trials to compare them")
        return
    runs = s.run_ids(chosen)
    configs: dict[str, str] = {}
    for name, run_id in runs.items():
        try:
            configs[name] = results.trial_config_text(s.client, run_id)
        except results.ResultsError as exc:
            st.warning(str(exc))
    if len(configs) >= 2:
        diff = data.config_diff(configs)
        st.markdown("**Config keys that differ**")
        if diff.empty:
            st.info("their configs are identical")
        else:
            st.dataframe(diff, hide_index=True, key="config-diff")
    learning_curves(s, runs, key="compare")


# -- export -----------------------------------------------------------------------------------------------------
def export_command(run_id: str, uri: str, experiment: str) -> str:
    """``python -m search.export`` for this trial; the store is named only where it is not export's default
    (export itself also reads MLFLOW_TRACKING_URI, which the shell running it may not have)."""
    command = f"python -m search.export --run {run_id} -o {EXPORT_NAME}"
    if uri != results.DEFAULT_TRACKING_URI:
        command += f" --tracking-uri {shlex.quote(uri)}"
    if experiment != results.DEFAULT_EXPERIMENT:
        command += f" --experiment {shlex.quote(experiment)}"
    return command


def train_command() -> str:
    return f"python -m trials.train {EXPORT_NAME}"


def _picked(s: Search, how: str) -> tuple[str, str] | None:
    """(run id, config YAML) of the trial ``how`` chooses, through ``search.export``'s own choice."""
    from search.export import export

    if how == PICK_TRIAL:
        options = list(s.trials.run_id)
        default = most_accurate(s.front, s.objectives) or options[0]
        run_id = str(st.selectbox("Trial", options, index=options.index(default), format_func=_describe(s),
                                  key=f"trial-{s.run_id}"))
        try:
            text = results.trial_config_text(s.client, run_id)
            TrialConfig.from_yaml(text, where=f"{s.trials.set_index('run_id').loc[run_id].trial} "
                                              f"{results.CONFIG_ARTIFACT}")
        except results.ResultsError as exc:
            st.warning(str(exc))
            return None
        except SpaceError as exc:
            # Exporting it would only move the failure to `python -m trials.train`; show why instead.
            st.warning(f"not a valid trial config, so it is not offered for export:\n\n{exc}")
            return None
        return run_id, text
    pick = how
    if how == PICK_BUDGET:
        budget = st.text_input("Size budget: trainable parameters (20000) or % of the model (2%)", value="2%",
                               key=f"export-budget-{s.run_id}").strip()
        pick = f"budget={budget}"
    try:
        run_id, cfg = export(s.uri, s.experiment, s.run_id, pick=pick)
    except results.ResultsError as exc:
        st.warning(mask(str(exc)))
        return None
    return run_id, cfg.to_yaml()


def export_view(s: Search) -> None:
    how = str(st.radio("Export", [PICK_BEST, PICK_KNEE, PICK_BUDGET, PICK_TRIAL], horizontal=True,
                       key=f"export-pick-{s.run_id}", help="best: the most accurate front trial (by its mean over "
                       "seeds where re-evaluated); knee: where the front's accuracy starts to cost many more "
                       "parameters; budget: the best front trial within a size"))
    picked = _picked(s, how)
    if picked is None:
        return
    run_id, text = picked
    row = s.trials.set_index("run_id").loc[run_id]
    st.markdown(f"**{row.trial}** · {row.methods or 'no methods'} · {row.status}")
    st.code(text, language="yaml")
    st.download_button(f"Download {EXPORT_NAME}", data=text, file_name=EXPORT_NAME, mime="text/yaml",
                       on_click="ignore", key=f"download-{run_id}")
    st.caption("The same from the command line, then the command that trains it on the schedule the search "
               "ranked:")
    st.code(export_command(run_id, s.uri, s.experiment), language="bash")
    st.code(train_command(), language="bash")
