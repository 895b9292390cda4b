"""Passwords in URLs are masked before they are logged, printed or shown, and can come from the environment."""

from __future__ import annotations

import pytest

from space.config import SearchSpace
from space.secrets import expand_env, mask


@pytest.mark.parametrize("text, want", [
    ("postgresql+psycopg2://mps:s3cr3t@db:5432/optuna", "postgresql+psycopg2://mps:***@db:5432/optuna"),
    ("storage: 'postgresql://u:p%40ss@127.0.0.1/x' # c", "storage: 'postgresql://u:***@127.0.0.1/x' # c"),
    ("a http://x:y@h/ and mysql://root:pw@h:3306/d", "a http://x:***@h/ and mysql://root:***@h:3306/d"),
    ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),  # nothing to mask
    ("http://mlflow:5000", "http://mlflow:5000"),  # a port is not a password
    ("ray://head:10001", "ray://head:10001"),
])
def test_mask_hides_the_password_of_every_url(text, want):
    assert mask(text) == want


def test_environment_variables_are_expanded_and_an_unset_one_names_the_key(monkeypatch):
    monkeypatch.setenv("MPS_TEST_PW", "hunter2")
    assert expand_env("postgresql://u:${MPS_TEST_PW}@h/db") == "postgresql://u:hunter2@h/db"
    space = SearchSpace.model_validate({"search": {"optuna_storage": "postgresql://u:${MPS_TEST_PW}@h/db"},
                                        "tracking": {"uri": "postgresql://u:${MPS_TEST_PW}@h/mlflow"}})
    assert space.search.optuna_storage == "postgresql://u:hunter2@h/db"
    assert space.tracking.uri == "postgresql://u:hunter2@h/mlflow"
    monkeypatch.delenv("MPS_TEST_PW")
    with pytest.raises(ValueError, match=r"search.optuna_storage[\s\S]*environment variable MPS_TEST_PW is not set"):
        SearchSpace.model_validate({"search": {"optuna_storage": "postgresql://u:${MPS_TEST_PW}@h/db"}})


def test_the_search_run_logs_space_yaml_with_passwords_masked(tmp_path):
    from mlflow.tracking import MlflowClient

    from search.tracking import SearchRun

    text = "search: {optuna_storage: 'postgresql+psycopg2://mps:s3cr3t@db:5432/optuna'}\n"
    space = SearchSpace.model_validate({"search": {"optuna_storage": "sqlite:///x.db"}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = SearchRun(uri, "exp", tmp_path / "artifacts", "s", space, text)
    path = MlflowClient(uri).download_artifacts(run.run_id, "space.yaml", str(tmp_path))
    logged = open(path).read()
    assert "s3cr3t" not in logged and "mps:***@db:5432" in logged
