"""The dashboard, run by ``AppTest`` against prepared MLflow stores (``conftest.py``): every view on a normal
search, and the empty, all-failed, unreachable, still-running and killed cases."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from streamlit.runtime.memory_media_file_storage import MemoryFile, MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1 import app_test as app_test_module

from search import results
from space.config import TrialConfig
from tests.dashboard.conftest import (
    APP,
    BASE_PARAMS,
    DEVICE_TAGS,
    EMPTY_EXPERIMENT,
    FAILED_EXPERIMENT,
    FAILURE_REASON,
    FINISHED,
    FRONT,
    HYPERVOLUME,
    KILLED_EXPERIMENT,
    MOST_ACCURATE_ON_FRONT,
    RUNGS,
    RUNNING_EXPERIMENT,
    STALE_EXPERIMENT,
    TIMEOUT,
    TRIALS,
    UNFINISHED_EXPERIMENT,
    Store,
    free_port,
)

VIEWS = ["Front", "Progress", "Methods", "Trials", "Export"]


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> dict[str, MemoryFile]:
    """Files handed to download buttons, by media file id: AppTest's storage is dropped after each run."""
    files: dict[str, MemoryFile] = {}

    class Recording(MemoryMediaFileStorage):
        def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):  # type: ignore[no-untyped-def]
            file_id = super().load_and_get_id(path_or_data, mimetype, kind, filename)
            files[file_id] = self.get_file(file_id)
            return file_id

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return files


def _plain(value: Any) -> Any:
    """A figure's JSON with plotly's binary arrays (``{"dtype", "bdata"}``) read back as lists."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _chart(at: AppTest, key: str = "pareto") -> dict:
    charts = [c for c in at.get("plotly_chart") if c.key == key]
    assert len(charts) == 1, [c.key for c in at.get("plotly_chart")]
    return _plain(json.loads(charts[0].proto.spec))


def _trial_traces(at: AppTest) -> list[dict]:
    return [t for t in _chart(at)["data"] if t.get("meta") == "trials"]


def _trace(at: AppTest, name: str, key: str = "pareto") -> dict:
    return next(t for t in _chart(at, key)["data"] if t.get("name") == name)


TABLES = {  # a table of the app: the columns only it has, and those it lacks
    "trials": ({"Pareto"}, set()), "method-marginals": ({"trials with"}, set()),
    "importances": ({"hyperparameter"}, {"value"}), "param-marginals": ({"hyperparameter", "value"}, set()),
    "timings": ({"measure"}, set()), "config-diff": ({"key"}, set())}


def _table(at: AppTest, name: str) -> pd.DataFrame:
    """The one table of the app that ``TABLES[name]`` describes (st.dataframe keeps no key AppTest can read)."""
    has, lacks = TABLES[name]
    tables = [d.value for d in at.dataframe if has <= set(d.value.columns) and not lacks & set(d.value.columns)]
    assert len(tables) == 1, [list(d.value.columns) for d in at.dataframe]
    return tables[0]


def _messages(at: AppTest) -> str:
    return " ".join(e.value for e in [*at.info, *at.warning, *at.error])


def _captions(at: AppTest) -> str:
    return " ".join(c.value for c in at.caption)


def _clean(at: AppTest) -> None:
    """No traceback and no view that failed to draw."""
    assert not at.exception, at.exception
    assert not [e.value for e in at.error if "could not be drawn" in e.value]


# -- the normal search: every view ------------------------------------------------------------------------------
def test_every_view_renders_as_a_tab_without_exceptions(rendered) -> None:
    at = rendered()
    _clean(at)
    assert [t.label for t in at.tabs] == VIEWS
    assert not at.error


def test_searches_are_offered_newest_first_with_the_newest_selected(store: Store, rendered) -> None:
    picker = rendered().selectbox(key="search")
    assert picker.value == store.search_run_id
    assert picker.options[0].startswith("newest-search · finished")
    assert picker.options[1].startswith("older-search")


def test_front_has_one_point_per_trial_coloured_by_its_method_family(rendered) -> None:
    traces = _trial_traces(rendered())
    plotted = {t["name"]: set(t["text"]) for t in traces}
    assert plotted == {"LoRA + parameter deltas": {"trial-001"}, "LoRA": {"trial-002", "trial-003", "trial-004"},
                       "parameter deltas": {"trial-005"}, "no method": {"trial-006"}}
    statuses = {text: cd[0] for t in traces for text, cd in zip(t["text"], t["customdata"], strict=True)}
    assert sorted(n for n, s in statuses.items() if s == "finished") == FINISHED


def test_colouring_by_status_plots_every_trial_under_its_status(run_app, store: Store) -> None:
    at = run_app(store.uri)
    at.radio(key=f"front-colour-{store.search_run_id}").set_value("status").run()
    plotted = {t["name"]: set(t["text"]) for t in _trial_traces(at)}
    assert plotted == {status: {t[0] for t in TRIALS if t[1] == status} for status in plotted}
    assert set(plotted) == {"finished", "pruned", "failed"}


def test_pruned_and_failed_trials_can_be_hidden(run_app, store: Store) -> None:
    at = run_app(store.uri)
    at.multiselect(key=f"front-status-{store.search_run_id}").set_value(["finished"]).run()
    assert {n for t in _trial_traces(at) for n in t["text"]} == set(FINISHED)
    assert set(_trace(at, "Pareto front")["text"]) == FRONT


def test_size_axis_is_logarithmic_with_a_top_axis_in_percent_of_the_model(rendered) -> None:
    layout = _chart(rendered())["layout"]
    assert layout["xaxis"]["type"] == "log" and layout["xaxis2"]["type"] == "log"
    assert layout["xaxis"]["title"]["text"] == "trainable parameters"
    assert layout["xaxis2"]["title"]["text"] == "% of the model"
    assert layout["yaxis"]["title"]["text"] == "validation accuracy"
    shift = math.log10(100 / BASE_PARAMS)  # the same place on both axes: count and percentage
    assert layout["xaxis2"]["range"] == pytest.approx([v + shift for v in layout["xaxis"]["range"]])


def test_front_is_a_step_line_through_exactly_the_non_dominated_finished_trials(rendered) -> None:
    front = _trace(rendered(), "Pareto front")
    assert set(front["text"]) == FRONT
    assert front["mode"] == "lines+markers" and front["line"]["shape"] == "hv"


def test_hover_shows_the_trials_sampled_config(rendered) -> None:
    trace = next(t for t in _trial_traces(rendered()) if "trial-002" in t["text"])
    hover = trace["customdata"][trace["text"].index("trial-002")][1]
    assert "lora_in_proj(r=2)" in hover and "lora_in_proj.rank=2" in hover and "a_log_delta.enabled=False" in hover
    assert "%{customdata[1]}" in trace["hovertemplate"]


def test_another_objective_pair_draws_its_own_front(run_app, store: Store) -> None:
    at = run_app(store.uri)
    at.selectbox(key=f"front-x-{store.search_run_id}").set_value("peak_memory_mb").run()
    _clean(at)
    assert _chart(at)["layout"]["xaxis"]["title"]["text"] == "peak memory (MB)"
    # trial-001 is both the most accurate and the lightest in memory: alone on that front
    assert set(_trace(at, "Pareto front")["text"]) == {"trial-001"}
    assert "peak memory (MB)" in at.selectbox(key=f"front-x-{store.search_run_id}").options


def test_trial_counts_by_status_are_shown(rendered) -> None:
    counts = {m.label: m.value for m in rendered().metric}
    assert counts == {"finished": "4", "pruned": "1", "failed": "1", "running": "0", "interrupted": "0",
                      "duplicate": "0", "rejected": "0"}


def test_progress_shows_the_logged_hypervolume_curve(rendered) -> None:
    trace = _chart(rendered(), "hypervolume")["data"][0]
    assert trace["y"] == HYPERVOLUME
    assert trace["x"] == list(range(1, len(HYPERVOLUME) + 1))


def test_progress_shows_the_best_accuracy_after_each_completed_trial(rendered) -> None:
    # The trials ended in the order 006, 005, ..., 001; 005 failed and 004 was pruned, so they change nothing.
    assert _chart(rendered(), "best")["data"][0]["y"] == [0.6, 0.6, 0.6, 0.7, 0.8, 0.9]
    assert "Pruning saved 360 training steps" in _captions(rendered())


def test_methods_view_gives_accuracy_with_and_without_each_method(rendered) -> None:
    table = _table(rendered(), "method-marginals").set_index("method")
    assert table.loc["lora_in_proj", "val_accuracy with"] == pytest.approx(0.8)  # 001, 002, 003
    assert table.loc["lora_in_proj", "val_accuracy without"] == pytest.approx(0.6)  # 006
    assert table.loc["a_log_delta", "val_accuracy with"] == pytest.approx(0.9)
    assert table.loc["a_log_delta", "trials without"] == 3
    assert table.loc["lora_in_proj", "trainable_params with"] == pytest.approx(3000)


def test_methods_view_gives_optuna_importances_per_objective_from_the_search_study(rendered) -> None:
    at = rendered()
    table = _table(at, "importances")
    assert {"val_accuracy", "trainable_params"} <= set(table.columns)
    assert "lora_in_proj.enabled" in set(table.hyperparameter)
    assert "from the Optuna study 'newest-search'" in _captions(at)


def test_importances_come_from_the_mlflow_params_when_the_study_cannot_be_reached(
        run_app, store: Store, tmp_path: Path) -> None:
    at = run_app(store.uri)
    at.text_input(key="optuna_storage").set_value(f"sqlite:///{tmp_path / 'none.db'}").run()
    _clean(at)
    assert "MLflow params" in _captions(at) and "could not be read" in _captions(at)
    assert "lora_in_proj.enabled" in set(_table(at, "importances").hyperparameter)
    assert not (tmp_path / "none.db").exists()


def test_methods_view_gives_each_hyperparameter_value_its_mean_accuracy(rendered) -> None:
    table = _table(rendered(), "param-marginals")
    rank = table[table.hyperparameter == "lora_in_proj.rank"].set_index("value")
    assert rank.loc["8", "val_accuracy"] == pytest.approx(0.9) and rank.loc["2", "trials"] == 1


def test_trial_table_marks_exactly_the_pareto_trials(rendered) -> None:
    table = _table(rendered(), "trials")
    assert set(table.trial) == {t[0] for t in TRIALS}
    assert set(table[table.Pareto].trial) == FRONT
    assert {"val_accuracy", "test_accuracy", "trainable_params", "methods", "status", "family"} <= set(table.columns)


def test_trial_table_filters_by_status_and_method(run_app, store: Store) -> None:
    at = run_app(store.uri)
    at.multiselect(key=f"filter-status-{store.search_run_id}").set_value(["finished"])
    at.multiselect(key=f"filter-methods-{store.search_run_id}").set_value(["a_log_delta"]).run()
    assert list(_table(at, "trials").trial) == ["trial-001"]
    at.multiselect(key=f"filter-methods-{store.search_run_id}").set_value([])
    at.text_input(key=f"filter-text-{store.search_run_id}").set_value("r=2").run()
    assert list(_table(at, "trials").trial) == ["trial-002"]


def test_trial_page_shows_config_timings_memory_and_learning_curve(store: Store, rendered) -> None:
    at = rendered()
    run_id = store.trial_run_ids[MOST_ACCURATE_ON_FRONT]
    assert at.selectbox(key=f"trial-page-{store.search_run_id}").value == run_id
    timings = dict(_table(at, "timings").values.tolist())
    assert timings["peak memory"] == "300 MB" and timings["steps trained"] == "480"
    assert timings["training time"] == "15.0 s" and timings["seconds per step"] == "0.031"
    assert timings["device"] == DEVICE_TAGS["mps.device"] and timings["kernel path"] == DEVICE_TAGS["mps.kernel"]
    curve = _trace(at, MOST_ACCURATE_ON_FRONT, key=f"curve-{run_id}-val_accuracy")
    assert curve["x"] == list(RUNGS) and curve["y"][-1] == pytest.approx(0.9)
    assert store.configs[MOST_ACCURATE_ON_FRONT].strip() in [c.value.strip() for c in at.code]


def test_choosing_another_trial_shows_its_config_and_a_failed_trials_reason(run_app, store: Store) -> None:
    at = run_app(store.uri)
    at.selectbox(key=f"trial-page-{store.search_run_id}").set_value(store.trial_run_ids["trial-005"]).run()
    _clean(at)
    assert store.configs["trial-005"].strip() in [c.value.strip() for c in at.code]
    assert FAILURE_REASON in " ".join(e.value for e in at.error)


def test_comparing_trials_shows_their_config_diff_and_overlaid_curves(run_app, store: Store) -> None:
    at = run_app(store.uri)
    at.multiselect(key=f"compare-{store.search_run_id}").set_value(["trial-001", "trial-002"]).run()
    _clean(at)
    diff = _table(at, "config-diff").set_index("key")
    assert diff.loc["methods.lora_in_proj.rank"].tolist() == ["8", "2"]
    assert "seed" in diff.index and "task.name" not in diff.index  # only what differs
    names = [t["name"] for t in _chart(at, "compare-val_accuracy")["data"]]
    assert names == ["trial-001", "trial-002"]


def test_export_defaults_to_the_best_trial_as_best_yaml_with_its_train_command(
        store: Store, run_app, downloads: dict[str, MemoryFile]) -> None:
    at = run_app(store.uri)
    exported = downloads[at.download_button[0].proto.url.rsplit("/", 1)[-1].split(".")[0]]
    assert exported.filename == "best.yaml"
    assert exported.content.decode() == store.configs[MOST_ACCURATE_ON_FRONT]
    TrialConfig.from_yaml(exported.content.decode())  # loads as the config a trial runs from
    assert "python -m trials.train best.yaml" in [c.value for c in at.code]


@pytest.mark.parametrize("pick", ["knee", "budget=2%"])
def test_export_picks_the_trial_search_export_picks(store: Store, run_app, pick: str) -> None:
    from search.export import export

    at = run_app(store.uri)
    at.radio(key=f"export-pick-{store.search_run_id}").set_value(pick.split("=")[0]).run()
    _clean(at)
    expected = export(store.uri, results.DEFAULT_EXPERIMENT, store.search_run_id, pick=pick)[0]
    assert f"python -m search.export --run {expected} -o best.yaml --tracking-uri {store.uri}" in \
        [c.value for c in at.code]
    assert expected == store.trial_run_ids["trial-002"]  # the knee; and the best within 3,000 parameters


def test_a_budget_nothing_fits_is_a_message_naming_the_front_sizes(store: Store, run_app) -> None:
    at = run_app(store.uri)
    at.radio(key=f"export-pick-{store.search_run_id}").set_value("budget").run()
    at.text_input(key=f"export-budget-{store.search_run_id}").set_value("10").run()
    _clean(at)
    assert "400, 1,000, 5,000" in _messages(at)
    assert not at.download_button


def test_export_of_a_chosen_trial_names_its_run_and_store(store: Store, run_app) -> None:
    at = run_app(store.uri)
    at.radio(key=f"export-pick-{store.search_run_id}").set_value("a trial").run()
    picker = at.selectbox(key=f"trial-{store.search_run_id}")
    assert picker.value == store.trial_run_ids[MOST_ACCURATE_ON_FRONT]
    picker.set_value(store.trial_run_ids["trial-003"]).run()
    shown = [c.value.strip() for c in at.code]
    run_id = store.trial_run_ids["trial-003"]
    assert f"python -m search.export --run {run_id} -o best.yaml --tracking-uri {store.uri}" in shown
    assert store.configs["trial-003"].strip() in shown


def test_export_cli_equivalent_writes_the_config_the_dashboard_shows(
        store: Store, rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.export import main as export_main

    command = next(c.value for c in rendered().code if c.value.startswith("python -m search.export"))
    monkeypatch.chdir(tmp_path)
    assert export_main(shlex.split(command)[3:]) == 0
    written = TrialConfig.from_yaml((tmp_path / "best.yaml").read_text())
    assert written == TrialConfig.from_yaml(store.configs[MOST_ACCURATE_ON_FRONT])


def test_export_cli_equivalent_is_bare_for_the_default_store() -> None:
    from dashboard.views import export_command

    command = export_command("abc123", results.DEFAULT_TRACKING_URI, results.DEFAULT_EXPERIMENT)
    assert command == "python -m search.export --run abc123 -o best.yaml"


def test_baselines_are_drawn_apart_from_the_trials_and_the_front() -> None:
    from dashboard.views import pareto_figure

    df = pd.DataFrame({"trial": ["trial-001", "trial-002", "trial-003"], "status": ["finished"] * 3,
                       "phase": ["search", "baseline", "baseline"],
                       "methods": ["lora_in_proj(r=2)", "baseline: full fine-tuning", "baseline: head only"],
                       "val_accuracy": [0.5, 0.7, 0.3], "trainable_params": [2000, 150_000, 650]})
    fig = pareto_figure(df, df.iloc[[0]], "trainable_params", "val_accuracy")
    names = [t.name for t in fig.data]
    assert names == ["LoRA", "baseline: full fine-tuning", "baseline: head only", "Pareto front"]
    assert list(fig.data[0].text) == ["trial-001"]  # the trial trace holds the searched trial only
    assert [t.marker.symbol for t in fig.data[1:3]] == ["triangle-up", "triangle-up"]


# -- the store: picking it, and what it holds -------------------------------------------------------------------
def test_launch_arguments_after_a_double_dash_set_the_sidebar_defaults() -> None:
    from dashboard.app import launch_defaults

    got = launch_defaults(["app.py", "-q", "--", "--tracking-uri", "sqlite:///x.db", "--experiment", "e"])
    assert (got.tracking_uri, got.experiment) == ("sqlite:///x.db", "e")


def test_tracking_uri_is_read_from_the_command_line(store: Store, run_app, tmp_path: Path) -> None:
    at = run_app(f"sqlite:///{tmp_path / 'missing.db'}", "--", "--tracking-uri", store.uri)
    assert at.text_input(key="tracking_uri").value == store.uri
    assert at.selectbox(key="search").value == store.search_run_id


def test_tracking_uri_can_be_changed_in_the_sidebar(store: Store, run_app, tmp_path: Path) -> None:
    at = run_app(f"sqlite:///{tmp_path / 'missing.db'}")
    at.text_input(key="tracking_uri").set_value(store.uri).run()
    _clean(at)
    assert at.selectbox(key="search").value == store.search_run_id


def test_empty_tracking_uri_asks_for_one_and_creates_no_store(store: Store, tmp_path: Path, run_app,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where MLflow would create mlflow.db for an empty URI
    at = run_app(store.uri)
    at.text_input(key="tracking_uri").set_value("").run()
    assert not at.exception
    assert "enter an MLflow tracking URI" in _messages(at)
    assert not list(tmp_path.iterdir())


def test_missing_store_shows_a_message_and_creates_nothing(tmp_path: Path, run_app) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    at = run_app(f"sqlite:///{db}")
    assert not at.exception
    assert str(db) in _messages(at)
    assert not db.exists()


@pytest.mark.parametrize("uri", ["nosuchscheme://host/store", "http://127.0.0.1:{port}",
                                 "postgresql+psycopg2://nobody@127.0.0.1:{port}/mlflow"])
def test_unreachable_store_is_an_error_naming_it_within_seconds(run_app, uri: str) -> None:
    uri = uri.format(port=free_port())
    started = time.monotonic()
    at = run_app(uri)
    assert not at.exception
    assert f"cannot read the MLflow store at {uri}" in " ".join(e.value for e in at.error)
    assert time.monotonic() - started < 30


def test_missing_experiment_shows_a_message_naming_it(store: Store, run_app) -> None:
    at = run_app(store.uri, "--experiment", "never-created")
    assert not at.exception
    assert "'never-created'" in _messages(at)


def test_experiment_without_searches_says_so(rendered) -> None:
    at = rendered(EMPTY_EXPERIMENT)
    assert not at.exception
    assert "no searches" in _messages(at)


def test_search_without_finished_trials_warns_there_is_no_front(rendered) -> None:
    at = rendered(UNFINISHED_EXPERIMENT)
    _clean(at)
    assert "no finished trials" in _messages(at)
    assert not [t for t in _chart(at)["data"] if t.get("name") == "Pareto front"]
    assert "parameter importances need at least two finished trials" in _messages(at)


def test_search_whose_trials_all_failed_says_so_with_the_reason(rendered) -> None:
    at = rendered(FAILED_EXPERIMENT)
    _clean(at)
    assert [t.label for t in at.tabs] == VIEWS
    assert f"all 3 trials of search 'every-trial-failed' failed, so there is nothing to compare: {FAILURE_REASON}" \
        in " ".join(e.value for e in at.error)
    assert "has no finished trials" in _messages(at)  # the export view, from search.export


def test_running_search_says_it_is_running_and_refreshes_itself(
        store: Store, run_app, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamlit as st

    intervals: list[Any] = []
    fragment = st.fragment

    def recording(func: Any = None, *, run_every: Any = None) -> Any:
        intervals.append(run_every)
        return fragment(func, run_every=run_every)

    monkeypatch.setattr(st, "fragment", recording)
    at = run_app(store.uri, "--experiment", RUNNING_EXPERIMENT)
    _clean(at)
    assert at.selectbox(key="search").options[0].startswith("live-search · running")
    assert "is still running (1 trial(s) training, 2 so far); this page refreshes every 15s" in _messages(at)
    assert intervals == ["15s"]
    finished = run_app(store.uri)
    assert not finished.exception and intervals[-1] is None  # a finished search is drawn once


def test_search_killed_and_never_resumed_is_shown_stale_not_running(rendered) -> None:
    at = rendered(STALE_EXPERIMENT)
    _clean(at)
    assert at.selectbox(key="search").options[0].startswith("abandoned-search · stale")
    assert "is stale, not running: no trial has started, reported or ended for 5.0 h" in _messages(at)
    assert "never resumed" in _messages(at) and "still running" not in _messages(at)


def test_search_whose_run_was_killed_without_a_state_is_shown_killed(rendered) -> None:
    at = rendered(KILLED_EXPERIMENT)
    _clean(at)
    assert at.selectbox(key="search").options[0].startswith("killed-search · killed")
    assert "its MLflow run is KILLED" in _messages(at)


# -- read-only ------------------------------------------------------------------------------------------------------
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_browsing_every_view_writes_nothing_to_either_store(store: Store, run_app) -> None:
    stores = [store.root / "mlflow.db", store.root / "optuna.db"]
    before = {p: _digest(p) for p in stores}
    files_before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    at = run_app(store.uri)
    at.multiselect(key=f"compare-{store.search_run_id}").set_value(["trial-001", "trial-002"]).run()
    at.radio(key=f"export-pick-{store.search_run_id}").set_value("knee").run()
    _clean(at)
    assert {p: _digest(p) for p in stores} == before
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == files_before


def test_dashboard_imports_neither_ray_nor_torch(store: Store) -> None:
    probe = ("import sys\n"
             "from streamlit.testing.v1 import AppTest\n"
             f"at = AppTest.from_file({str(APP)!r}, default_timeout={TIMEOUT}).run()\n"
             "assert not at.exception, at.exception\n"
             "assert len(at.get('plotly_chart')) > 1\n"
             "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=Path(APP).parents[1], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
