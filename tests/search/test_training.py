"""From a search's trial to a registered model: export, train (logged to MLflow under its trial), register, and load
with MLflow's own loader, against a sqlite store. The search is one trial trained in-process, the way a Ray worker
trains it, recorded the way search.tracking records it (tests/search/test_end_to_end.py does the same through Ray)."""

from __future__ import annotations

import json

import pytest

from search import results
from search.export import main as export_main
from search.training import TrainingRun
from space.config import TrialConfig
from tests.conftest import small_trial_yaml
from tests.trials.test_predict import digits_lines
from trials.predict import load_predictor
from trials.run import run_trial
from trials.train import main as train_main

EXPERIMENT = results.DEFAULT_EXPERIMENT


def make_search(tmp_path, methods: str) -> tuple[str, str, str, dict]:
    """A store holding a finished search of one trial: (tracking URI, search run id, trial run id, its metrics)."""
    from mlflow.tracking import MlflowClient

    cfg = TrialConfig.from_yaml(small_trial_yaml(methods=methods, steps=4, eval_every=2))
    metrics = run_trial(cfg).metrics()
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "runs" / "mlartifacts").as_uri())
    search = c.create_run(exp, run_name="s", tags={"mps.kind": "search", "mps.status": "finished"}).info.run_id
    trial = c.create_run(exp, run_name="trial-000", tags={
        "mlflow.parentRunId": search, "mps.kind": "trial", "mps.status": "finished", "mps.phase": "search"}).info.run_id
    c.log_text(trial, cfg.to_yaml(), results.CONFIG_ARTIFACT)
    for key in ("val_accuracy", "test_accuracy", "trainable_params"):
        c.log_metric(trial, key, metrics[key])
    c.set_terminated(trial)
    c.set_terminated(search)
    return uri, search, trial, metrics


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The search's trial exported, trained with ``--register digits-best`` and its outputs."""
    tmp = tmp_path_factory.mktemp("registered")
    uri, search, trial, trial_metrics = make_search(tmp, "lora_in_proj: {rank: 2}\n  a_log_delta: {}")
    assert export_main(["--tracking-uri", uri, "-o", str(tmp / "best.yaml")]) == 0
    # No --tracking-uri: the store is the one the exported file names.
    assert train_main([str(tmp / "best.yaml"), "--out", str(tmp / "out"), "--register", "digits-best"]) == 0
    return uri, search, trial, trial_metrics, tmp / "out"


def test_the_exported_trial_retrained_reproduces_its_validation_accuracy(registered):
    *_, trial_metrics, out = registered
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["steps"] == 4  # the search's schedule, not a default
    assert trained["val_accuracy"] == pytest.approx(trial_metrics["val_accuracy"], abs=0.005)


def test_the_training_run_is_logged_under_its_trial_and_search_and_is_no_trial(registered):
    uri, search, trial, _, out = registered
    c = results.client(uri)
    [run] = c.search_runs([results.experiment_id(c, EXPERIMENT)], filter_string="tags.`mps.kind` = 'training'")
    tags = run.data.tags
    assert (tags["mps.search"], tags["mps.trial"], tags["mlflow.parentRunId"]) == (search, trial, trial)
    assert run.info.status == "FINISHED" and tags["mps.status"] == "finished"
    saved = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["val_accuracy"] == saved["val_accuracy"]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")] == [2, 4]
    assert "lora_in_proj" in results.trial_config_text(c, run.info.run_id)
    assert list(results.trials(c, EXPERIMENT, search).run_id) == [trial]  # still a search of one trial


def test_the_registered_model_loads_with_mlflows_loader_and_reproduces_the_test_accuracy(registered):
    import mlflow
    import pandas as pd

    uri, *_, out = registered
    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version("digits-best", "1")
    saved = json.loads((out / "metrics.json").read_text())
    assert float(version.tags["test_accuracy"]) == saved["test_accuracy"] and version.tags["form"] == "merged"
    model = mlflow.pyfunc.load_model("models:/digits-best/1")
    lines, labels = digits_lines()
    predicted = model.predict(pd.DataFrame({"text": lines}))
    assert list(predicted.columns[:2]) == ["label", "probability"]
    assert (predicted.label == labels).mean() == pytest.approx(saved["test_accuracy"], abs=1e-9)


def test_a_model_that_cannot_merge_registers_its_adapter(tmp_path, capsys):
    import warnings

    import mlflow
    import pandas as pd

    uri, *_ = make_search(tmp_path, "parallel_adapter: {rank: 2}")
    assert export_main(["--tracking-uri", uri, "-o", str(tmp_path / "best.yaml")]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_main([str(tmp_path / "best.yaml"), "--out", str(tmp_path / "out"), "--register", "adapted"]) == 0
    assert not [str(w.message) for w in caught if "mlflow" in w.filename], "MLflow's warnings reach the terminal"
    printed = capsys.readouterr()
    assert "registered as adapted version 1" in printed.out
    assert "Successfully registered model" not in printed.err and "Created version" not in printed.err
    assert not (tmp_path / "out" / "merged").exists()
    mlflow.set_tracking_uri(uri)
    assert mlflow.MlflowClient().get_model_version("adapted", "1").tags["form"] == "adapter"
    lines = digits_lines()[0][:5]
    predicted = mlflow.pyfunc.load_model("models:/adapted/1").predict(pd.DataFrame({"text": lines}))
    expected = load_predictor(tmp_path / "out").predict(lines)
    assert list(predicted.label) == [r["label"] for r in expected]


def test_a_config_exported_from_a_run_the_store_lacks_is_an_error_before_training(tmp_path, capsys):
    best = tmp_path / "best.yaml"
    best.write_text(f"# exported from MLflow run {'ab' * 16} (sqlite:///elsewhere.db)\n"
                    + TrialConfig.from_yaml(small_trial_yaml()).to_yaml())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert train_main([str(best), "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 2
    assert f"exported from MLflow run {'ab' * 16}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_config_that_was_not_exported_is_logged_without_links(tmp_path):
    best = tmp_path / "mine.yaml"
    best.write_text(small_trial_yaml())
    run = TrainingRun.for_config(best, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.links == {} and run.run_name == "train-mine"


def test_the_pyfunc_model_is_defined_without_mlflows_type_hint_warning():
    """``trials.train --register`` prints the project's own lines, not MLflow's "Add type hints" UserWarning (raised
    when the pyfunc class is defined, so a fresh interpreter imports it)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-W", "always", "-c", "import search.training"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "type hint" not in done.stderr.lower(), done.stderr
