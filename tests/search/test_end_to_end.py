"""A real search through Ray Tune, Optuna and MLflow, then export and training of the chosen trial."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch

from search import results
from search.export import main as export_main
from search.run import main as search_main
from tests.conftest import IN_CI, REPO
from trials.train import load_trained
from trials.train import main as train_main

SPACE = """
name: e2e
model: {{checkpoint: embedded}}
task: {{name: digits, shots_per_class: 2}}
methods:
  lora_in_proj: {{enabled: search, rank: {{choices: [1, 2]}}}}
  a_log_delta: {{enabled: search}}
training: {{steps: 6, final_steps: 4, batch_size: 8, eval_every: 2}}
search:
  num_trials: {trials}
  concurrency: 2
  early_stopping: {{enabled: true, grace_period: 1, reduction_factor: 2}}
  results_dir: {results}
{extra}
"""


def run_search(tmp_path, trials: int = 3, extra: str = "") -> str:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE.format(trials=trials, results=tmp_path / "runs", extra=extra))
    assert search_main([str(space), "--quiet"]) == 0
    return str(space)


def check_search_and_export(tmp_path, uri: str, trials: int) -> None:
    c = results.client(uri)
    info = results.latest_search(c, "mamba-peft-search")
    assert info["status"] == results.STATUS_FINISHED
    df = results.trials(c, "mamba-peft-search", info["run_id"])
    assert len(df) == trials
    assert set(df.status) <= {results.STATUS_FINISHED, results.STATUS_STOPPED}
    finished = df[df.status == results.STATUS_FINISHED]
    assert not finished.empty and finished.test_accuracy.notna().all()
    for run_id in df.run_id:  # every trial has its config and a validation curve
        assert results.trial_config_text(c, run_id).startswith("model:")
        assert c.get_metric_history(run_id, "val_accuracy")

    best = tmp_path / "best.yaml"
    assert export_main(["--tracking-uri", uri, "-o", str(best)]) == 0
    front = results.pareto(df, ["val_accuracy", "trainable_params"])
    assert f"run {front.iloc[0].run_id}" in best.read_text().splitlines()[0]


@pytest.mark.slow
def test_search_logs_every_trial_then_export_and_train_the_best(tmp_path):
    run_search(tmp_path)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    check_search_and_export(tmp_path, uri, 3)

    out = tmp_path / "trained"
    assert train_main([str(tmp_path / "best.yaml"), "--out", str(out)]) == 0
    assert (out / "adapter" / "adapter.safetensors").exists() and (out / "metrics.json").exists()
    ids = torch.randint(259, 276, (3, 64))
    lengths = torch.full((3,), 64)
    with torch.no_grad():
        adapted = load_trained(out)(ids, lengths)
        if (out / "merged").exists():
            merged = load_trained(out, merged=True)(ids, lengths)
            assert ((merged - adapted).abs().max() / adapted.abs().max()) < 1e-5


def test_invalid_space_exits_2_and_starts_nothing(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(f"search: {{results_dir: {tmp_path / 'runs'}}}\nmethods: {{lora_in_proj: {{rank: 0}}}}\n")
    proc = subprocess.run([sys.executable, "-m", "search.run", str(space)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "space.yaml: methods.lora_in_proj.rank: 0 is below 1" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_export_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert export_main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "-o", str(tmp_path / "b.yaml")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "b.yaml").exists()


def test_train_with_a_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "best.yaml"
    bad.write_text("model: {}\ntask: {}\nmethods: {lora_in_proj: {rank: -1}}\ntraining: {}\n")
    assert train_main([str(bad)]) == 2
    assert "best.yaml: methods.lora_in_proj" in capsys.readouterr().err


def _postgres_databases(count: int):
    """Fresh databases on the local PostgreSQL, or None where there is none (never None in CI)."""
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except Exception as exc:
        if IN_CI:
            raise AssertionError(f"PostgreSQL is required in CI: {exc}") from exc
        return None
    conn.autocommit = True
    names = [f"mps_test_{uuid.uuid4().hex[:10]}" for _ in range(count)]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f"CREATE DATABASE {name}")
    return conn, names


@pytest.mark.slow
@pytest.mark.postgres
def test_search_with_optuna_and_mlflow_on_postgresql(tmp_path):
    # Two databases, as in docker-compose.yml: Optuna and MLflow both keep an alembic_version table.
    dbs = _postgres_databases(2)
    if dbs is None:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 (this test is required in CI)")
    conn, (optuna_db, mlflow_db) = dbs
    optuna_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{optuna_db}"
    mlflow_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{mlflow_db}"
    try:
        extra = f"  optuna_storage: {optuna_url}\n  study_name: pg-study\ntracking: {{uri: '{mlflow_url}'}}\n"
        # `extra` continues the `search:` block, then opens `tracking:`
        run_search(tmp_path, trials=2, extra=extra)
        check_search_and_export(tmp_path, mlflow_url, 2)
        import optuna

        study = optuna.load_study(study_name="pg-study", storage=optuna_url)
        assert len(study.trials) == 2
    finally:
        with conn.cursor() as cur:
            for name in (optuna_db, mlflow_db):
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()
