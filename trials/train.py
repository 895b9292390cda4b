"""Train one configuration with its full schedule and save it: ``python -m trials.train best.yaml``.

Writes to ``--out`` (default ``outputs/<config name>``) what ``trials.trained.train`` saves: the trial config, the
adapter, the merged model when every method merges, ``task.json`` and ``metrics.json``. ``python -m trials.predict
OUT texts.txt`` runs the saved model on new inputs. The training run is logged to MLflow through ``search.training``
(``--register NAME`` puts the model in the registry), wired in ``main`` only: the library knows nothing of MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from space.config import SpaceError, TrialConfig
from trials.trained import train


def config_argument(path: Path, steps: int | None) -> TrialConfig | None:
    """The trial config a command line names, with its ``--steps`` checked; None after printing why not (a missing
    or invalid file, a step count below 1), for the command to exit with 2."""
    if not path.exists():
        print(f"error: {path}: no such file", file=sys.stderr)
        return None
    try:
        cfg = TrialConfig.from_yaml(path.read_text(), where=str(path))
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if steps is not None and steps < 1:
        print(f"error: --steps {steps} is below 1", file=sys.stderr)
        return None
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trials.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="a trial config, e.g. best.yaml from `python -m search.export`")
    p.add_argument("--out", type=Path, help="output directory (default outputs/<config file stem>)")
    p.add_argument("--steps", type=int, help="override the budget (training.rungs[-1], the schedule the search ranked)")
    p.add_argument("--register", metavar="NAME", help="register the model in the MLflow model registry as NAME (the "
                   "merged model, or the adapter when a method cannot be merged), with its metrics")
    p.add_argument("--tracking-uri", help="the MLflow store to log to (default: the store the config was exported "
                   "from, else $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    p.add_argument("--experiment", help="the MLflow experiment (default: the exported trial's, else mamba-peft-search)")
    p.add_argument("--no-mlflow", action="store_true", help="train and save without logging to MLflow")
    a = p.parse_args(argv)
    cfg = config_argument(a.config, a.steps)
    if cfg is None:
        return 2
    if a.no_mlflow and a.register:
        print("error: --register needs MLflow; drop --no-mlflow", file=sys.stderr)
        return 2
    log = None
    if not a.no_mlflow:
        # The MLflow side lives in search/ (STYLE.md: trials/ runs without MLflow); imported only by this command.
        from search.training import TrainingLogError, TrainingRun

        try:
            log = TrainingRun.for_config(a.config, a.tracking_uri, a.experiment, a.register)
        except TrainingLogError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = a.out or Path("outputs") / a.config.stem
    train(cfg, out, a.steps, log=log)
    if log is not None:
        print(f"logged as MLflow run {log.run_id} ({log.where})")
        if log.version is not None:
            print(f"registered as {a.register} version {log.version}: mlflow.pyfunc.load_model"
                  f"(\"models:/{a.register}/{log.version}\")")
    print(f"predict with `python -m trials.predict {out} texts.txt`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
