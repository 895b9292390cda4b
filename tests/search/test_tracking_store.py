"""Opening the MLflow store: a new sqlite store is created quietly (no INFO lines from its migrations)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_new_sqlite_store_is_created_without_mlflow_info_lines(tmp_path):
    code = ("import sys; from pathlib import Path; from search.tracking import open_store; "
            "client, exp = open_store(sys.argv[1], 'quiet', Path(sys.argv[2])); "
            "print(client.get_experiment(exp).name)")
    db = tmp_path / "store" / "mlflow.db"
    done = subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}", str(tmp_path / "art")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "quiet" and db.exists()
    assert "database tables" not in done.stderr, done.stderr


def test_trials_train_s_new_store_is_created_without_mlflow_info_lines(tmp_path):
    from tests.conftest import small_trial_yaml

    cfg = tmp_path / "best.yaml"
    cfg.write_text(small_trial_yaml())
    code = ("import sys; from pathlib import Path; from search.training import TrainingRun; "
            "run = TrainingRun.for_config(Path(sys.argv[1]), tracking_uri=sys.argv[2]); print(run.run_name)")
    db = tmp_path / "train-store" / "mlflow.db"
    done = subprocess.run([sys.executable, "-c", code, str(cfg), f"sqlite:///{db}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "train-best" and db.exists()
    assert "database tables" not in done.stderr, done.stderr
