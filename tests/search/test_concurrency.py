"""Two searches at once, each with concurrent trials, writing to one PostgreSQL Optuna storage and one PostgreSQL
MLflow store: nothing is lost or duplicated."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from search import results
from tests.search.test_end_to_end import SPACE


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_two_searches_writing_to_one_postgresql_store_at_once_lose_and_duplicate_nothing(tmp_path, postgres_stores):
    optuna_url, mlflow_url = postgres_stores
    trials = {"left": 4, "right": 3}
    drivers = {}
    for name, n in trials.items():
        space = tmp_path / f"{name}.yaml"
        extra = f"  optuna_storage: {optuna_url}\n  study_name: {name}\ntracking: {{uri: '{mlflow_url}'}}\n"
        text = SPACE.format(trials=n, results=tmp_path / name, extra=extra, concurrency=2)
        space.write_text(text.replace("name: e2e", f"name: {name}"))
        drivers[name] = subprocess.Popen([sys.executable, "-m", "search.run", str(space), "--quiet"],
                                         env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
    for name, proc in drivers.items():
        out, _ = proc.communicate(timeout=800)
        assert proc.returncode == 0, f"{name}: {out[-3000:]}"

    c = results.client(mlflow_url)
    searches = results.searches(c, "mamba-peft-search")
    assert sorted(n.rsplit("-", 2)[0] for n in searches.name) == ["left", "right"]  # name-date-time
    numbers_seen: set[tuple[str, int]] = set()
    for name, n in trials.items():
        run_id = searches[searches.name.str.startswith(f"{name}-")].run_id.iloc[0]
        info = results.search_info(c, "mamba-peft-search", run_id)
        df = results.trials(c, "mamba-peft-search", info["run_id"])
        searched = df[df.phase != results.REEVALUATE]
        assert len(searched) == n, (name, searched[["run_id", "status"]])
        study = optuna.load_study(study_name=name, storage=optuna_url)
        assert len(study.trials) == n
        assert sorted(t.number for t in study.trials) == list(range(n))  # none lost, none twice
        states = sorted(t.state.name for t in study.trials)
        assert states.count("RUNNING") == 0 and states.count("WAITING") == 0
        runs = set(df.run_id)
        assert len(runs) == len(df)  # no MLflow run counted twice
        numbers_seen |= {(name, int(t.number)) for t in study.trials}
    assert len(numbers_seen) == sum(trials.values())
