"""The dashboard against a real MLflow sqlite store laid out as ``search.tracking`` writes it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from streamlit.runtime.memory_media_file_storage import MemoryFile, MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1 import app_test as app_test_module

from search import results
from space.config import SearchSpace, TrialConfig, sample_trial

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "dashboard" / "app.py"
TIMEOUT = 30

EMPTY_EXPERIMENT = "no-searches-yet"
UNFINISHED_EXPERIMENT = "nothing-finished"

SPACE = SearchSpace(methods={
    "lora_in_proj": {"enabled": "search", "rank": {"choices": [1, 2, 4, 8]}},
    "a_log_delta": {"enabled": "search"},
})

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


@dataclass
class Store:
    uri: str
    search_run_id: str = ""
    trial_run_ids: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)


def _config(rank: int | None, a_log: bool, seed: int) -> TrialConfig:
    params: dict[str, object] = {"lora_in_proj.enabled": rank is not None, "a_log_delta.enabled": a_log}
    if rank is not None:
        params["lora_in_proj.rank"] = rank
    return sample_trial(SPACE, optuna.trial.FixedTrial(params), seed=seed)


def _search(c: MlflowClient, exp_id: str, name: str, start_ms: int) -> str:
    run = c.create_run(exp_id, run_name=name, start_time=start_ms, tags={
        "mps.kind": "search", "mps.status": results.STATUS_FINISHED,
        "mps.objectives": json.dumps(["val_accuracy", "trainable_params"])})
    c.log_param(run.info.run_id, "num_trials", len(TRIALS))
    return run.info.run_id


def _trial(c: MlflowClient, exp_id: str, parent: str, name: str, status: str,
           metrics: dict[str, float], config: TrialConfig) -> str:
    run = c.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent, "mps.kind": "trial",
                                                    "mps.status": status, "mps.summary": config.summary()})
    run_id = run.info.run_id
    for key, value in metrics.items():
        c.log_metric(run_id, key, value)
    c.log_text(run_id, config.to_yaml(), results.CONFIG_ARTIFACT)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("store")
    built = Store(uri=f"sqlite:///{tmp / 'mlflow.db'}")
    c = MlflowClient(tracking_uri=built.uri)
    art = (tmp / "art").as_uri()
    now = int(time.time() * 1000)

    exp = c.create_experiment(results.DEFAULT_EXPERIMENT, artifact_location=art)
    old = _search(c, exp, "older-search", now - 86_400_000)
    _trial(c, exp, old, "trial-001", results.STATUS_FINISHED, {"val_accuracy": 0.5, "trainable_params": 10},
           _config(None, False, seed=99))
    built.search_run_id = _search(c, exp, "newest-search", now)
    for seed, (name, status, acc, n_params, rank, a_log) in enumerate(TRIALS):
        config = _config(rank, a_log, seed)
        built.configs[name] = config.to_yaml()
        built.trial_run_ids[name] = _trial(c, exp, built.search_run_id, name, status, {
            "val_accuracy": acc, "test_accuracy": acc - 0.05, "trainable_params": n_params}, config)

    c.create_experiment(EMPTY_EXPERIMENT, artifact_location=art)
    exp = c.create_experiment(UNFINISHED_EXPERIMENT, artifact_location=art)
    parent = _search(c, exp, "all-stopped", now)
    _trial(c, exp, parent, "trial-001", results.STATUS_PRUNED, {"val_accuracy": 0.4}, _config(2, False, 0))
    _trial(c, exp, parent, "trial-002", results.STATUS_FAILED, {}, _config(None, True, 1))
    return built


@pytest.fixture
def run_app(monkeypatch: pytest.MonkeyPatch):
    """Run the app as ``streamlit run dashboard/app.py -- ARGS`` with MLFLOW_TRACKING_URI set to ``uri``."""

    def run(uri: str, *args: str) -> AppTest:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(sys, "argv", [str(APP), *args])
        return AppTest.from_file(APP, default_timeout=TIMEOUT).run()

    return run


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


def _figure(at: AppTest) -> dict:
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    return json.loads(charts[0].proto.spec)


def _trace(at: AppTest, name: str) -> dict:
    return next(t for t in _figure(at)["data"] if t.get("name") == name)


def _messages(at: AppTest) -> str:
    return " ".join(e.value for e in [*at.info, *at.warning, *at.error])


def test_app_renders_a_plotly_chart_without_exceptions(store: Store, run_app) -> None:
    at = run_app(store.uri)
    assert not at.exception
    assert len(at.get("plotly_chart")) == 1


def test_searches_are_offered_newest_first_with_the_newest_selected(store: Store, run_app) -> None:
    picker = run_app(store.uri).selectbox(key="search")
    assert picker.value == store.search_run_id
    assert picker.options[0].startswith("newest-search · finished")
    assert picker.options[1].startswith("older-search")


def test_every_trial_is_plotted_under_its_status(store: Store, run_app) -> None:
    at = run_app(store.uri)
    plotted = {name: set(_trace(at, name)["text"]) for name in ("finished", "pruned", "failed")}
    assert plotted == {status: {t[0] for t in TRIALS if t[1] == status} for status in plotted}


def test_plot_has_trainable_params_on_a_log_x_axis_and_accuracy_on_y(store: Store, run_app) -> None:
    layout = _figure(run_app(store.uri))["layout"]
    assert layout["xaxis"]["type"] == "log"
    assert layout["xaxis"]["title"]["text"] == "trainable parameters"
    assert layout["yaxis"]["title"]["text"] == "validation accuracy"


def test_pareto_trace_holds_exactly_the_non_dominated_finished_trials(store: Store, run_app) -> None:
    front = _trace(run_app(store.uri), "Pareto front")
    assert set(front["text"]) == FRONT
    assert front["mode"] == "lines+markers" and front["line"]["shape"] == "hv"


def test_trial_table_marks_exactly_the_pareto_trials(store: Store, run_app) -> None:
    table = run_app(store.uri).dataframe[0].value
    assert set(table.trial) == {t[0] for t in TRIALS}
    assert set(table[table.Pareto].trial) == FRONT
    assert {"val_accuracy", "test_accuracy", "trainable_params", "methods", "status"} <= set(table.columns)


def test_trial_counts_by_status_are_shown(store: Store, run_app) -> None:
    counts = {m.label: m.value for m in run_app(store.uri).metric}
    assert counts == {"finished": "4", "pruned": "1", "failed": "1", "running": "0", "interrupted": "0",
                      "duplicate": "0", "rejected": "0"}


def test_default_trial_is_the_most_accurate_pareto_trial(store: Store, run_app) -> None:
    picker = run_app(store.uri).selectbox(key=f"trial-{store.search_run_id}")
    assert picker.value == store.trial_run_ids[MOST_ACCURATE_ON_FRONT]


def test_download_button_exports_the_selected_trials_config_as_best_yaml(
        store: Store, run_app, downloads: dict[str, MemoryFile]) -> None:
    button = run_app(store.uri).download_button[0]
    exported = downloads[button.proto.url.rsplit("/", 1)[-1].split(".")[0]]
    assert exported.filename == "best.yaml"
    assert exported.content.decode() == store.configs[MOST_ACCURATE_ON_FRONT]
    TrialConfig.from_yaml(exported.content.decode())  # loads as the config a trial runs from


def test_export_cli_equivalent_names_the_selected_run_and_its_store(store: Store, run_app) -> None:
    run_id = store.trial_run_ids[MOST_ACCURATE_ON_FRONT]
    shown = [c.value for c in run_app(store.uri).code]
    assert f"python -m search.export --run {run_id} -o best.yaml --tracking-uri {store.uri}" in shown


def test_export_cli_equivalent_writes_the_config_the_dashboard_shows(
        store: Store, run_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.export import main as export_main

    command = next(c.value for c in run_app(store.uri).code if c.value.startswith("python -m search.export"))
    monkeypatch.chdir(tmp_path)
    assert export_main(shlex.split(command)[3:]) == 0
    written = TrialConfig.from_yaml((tmp_path / "best.yaml").read_text())
    assert written == TrialConfig.from_yaml(store.configs[MOST_ACCURATE_ON_FRONT])


def test_default_trial_agrees_with_search_export_default(store: Store, run_app) -> None:
    from search.export import export

    picker = run_app(store.uri).selectbox(key=f"trial-{store.search_run_id}")
    assert picker.value == export(store.uri, results.DEFAULT_EXPERIMENT)[0]


def test_export_cli_equivalent_is_bare_for_the_default_store() -> None:
    from dashboard.app import export_command

    command = export_command("abc123", results.DEFAULT_TRACKING_URI, results.DEFAULT_EXPERIMENT)
    assert command == "python -m search.export --run abc123 -o best.yaml"


def test_launch_arguments_after_a_double_dash_set_the_sidebar_defaults() -> None:
    from dashboard.app import launch_defaults

    got = launch_defaults(["app.py", "-q", "--", "--tracking-uri", "sqlite:///x.db", "--experiment", "e"])
    assert (got.tracking_uri, got.experiment) == ("sqlite:///x.db", "e")


def test_choosing_another_trial_shows_its_config(store: Store, run_app) -> None:
    at = run_app(store.uri)
    at.selectbox(key=f"trial-{store.search_run_id}").set_value(store.trial_run_ids["trial-003"]).run()
    assert not at.exception
    assert store.configs["trial-003"].strip() in [c.value.strip() for c in at.code]


def test_missing_store_shows_a_message_and_creates_nothing(tmp_path: Path, run_app) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    at = run_app(f"sqlite:///{db}")
    assert not at.exception
    assert str(db) in _messages(at)
    assert not db.exists()


def test_unreadable_store_shows_an_error_naming_the_uri(run_app) -> None:
    at = run_app("nosuchscheme://host/store")
    assert not at.exception
    assert "nosuchscheme://host/store" in " ".join(e.value for e in at.error)


def test_empty_tracking_uri_asks_for_one_and_creates_no_store(store: Store, tmp_path: Path, run_app,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where MLflow would create mlflow.db for an empty URI
    at = run_app(store.uri)
    at.text_input(key="tracking_uri").set_value("").run()
    assert not at.exception
    assert "enter an MLflow tracking URI" in _messages(at)
    assert not list(tmp_path.iterdir())


def test_missing_experiment_shows_a_message_naming_it(store: Store, run_app) -> None:
    at = run_app(store.uri, "--experiment", "never-created")
    assert not at.exception
    assert "'never-created'" in _messages(at)


def test_experiment_without_searches_says_so(store: Store, run_app) -> None:
    at = run_app(store.uri, "--experiment", EMPTY_EXPERIMENT)
    assert not at.exception
    assert "no searches" in _messages(at)


def test_search_without_finished_trials_warns_there_is_no_front(store: Store, run_app) -> None:
    at = run_app(store.uri, "--experiment", UNFINISHED_EXPERIMENT)
    assert not at.exception
    assert "no finished trials" in _messages(at)
    assert not [t for t in _figure(at)["data"] if t.get("name") == "Pareto front"]


def test_tracking_uri_is_read_from_the_command_line(store: Store, run_app, tmp_path: Path) -> None:
    at = run_app(f"sqlite:///{tmp_path / 'missing.db'}", "--", "--tracking-uri", store.uri)
    assert at.text_input(key="tracking_uri").value == store.uri
    assert at.selectbox(key="search").value == store.search_run_id


def test_tracking_uri_can_be_changed_in_the_sidebar(store: Store, run_app, tmp_path: Path) -> None:
    at = run_app(f"sqlite:///{tmp_path / 'missing.db'}")
    at.text_input(key="tracking_uri").set_value(store.uri).run()
    assert not at.exception
    assert at.selectbox(key="search").value == store.search_run_id


def test_dashboard_imports_neither_ray_nor_torch(store: Store) -> None:
    probe = ("import sys\n"
             "from streamlit.testing.v1 import AppTest\n"
             f"at = AppTest.from_file({str(APP)!r}, default_timeout={TIMEOUT}).run()\n"
             "assert not at.exception, at.exception\n"
             "assert len(at.get('plotly_chart')) == 1\n"
             "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_baselines_are_drawn_apart_from_the_trials_and_the_front() -> None:
    import pandas as pd

    from dashboard.app import pareto_figure

    df = pd.DataFrame({"trial": ["trial-001", "trial-002", "trial-003"], "status": ["finished"] * 3,
                       "phase": ["search", "baseline", "baseline"],
                       "methods": ["lora_in_proj(r=2)", "baseline: full fine-tuning", "baseline: head only"],
                       "val_accuracy": [0.5, 0.7, 0.3], "trainable_params": [2000, 150_000, 650]})
    front = df.iloc[[0]]
    fig = pareto_figure(df, front, "trainable_params", "val_accuracy", staircase=True)
    names = [t.name for t in fig.data]
    assert names == ["finished", "baseline: full fine-tuning", "baseline: head only", "Pareto front"]
    assert list(fig.data[0].text) == ["trial-001"]  # the status trace holds the searched trial only
    assert [t.marker.symbol for t in fig.data[1:3]] == ["triangle-up", "triangle-up"]
