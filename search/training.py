"""The MLflow side of ``python -m trials.train``: the training run of a chosen trial, and ``--register NAME``.

``trials.train`` trains and saves without MLflow; its command hands ``train`` a ``TrainingRun`` from here (its
``TrainingLog``). A config written by ``search.export`` names the trial run it came from on its first line. The
training run goes into that trial's experiment, under that trial's run (``mlflow.parentRunId``), with the tags
``mps.kind=training``, ``mps.search`` (the search run) and ``mps.trial`` (the trial run). ``search.results.trials``
reads a search's own children only, so a training run is never counted as a trial. A config that was not exported
is logged without those links.

The run holds the config, the validation curve, the final metrics, ``metrics.json``, ``task.json`` and the adapter.
``--register NAME`` logs the saved model as an MLflow pyfunc model (``TrainedModel``, from code in
``search/registered_model.py``: the merged model when every method merges, else the base model plus the adapter)
and registers it as a new version of NAME, tagged with its metrics.
``mlflow.pyfunc.load_model("models:/NAME/1").predict(pd.DataFrame({"text": [...]}))`` then returns what
``python -m trials.predict`` prints, wherever this project is installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd  # the pyfunc model's input type, which MLflow resolves from this module's globals

from search.results import CONFIG_ARTIFACT, DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, quiet_store_logs
from space.config import TrialConfig
from space.secrets import mask
from trials.trained import TASK_FILE

# search.export's first line: "# exported from MLflow run <id> (<tracking URI, password masked>)"
EXPORT_HEADER = re.compile(r"^# exported from MLflow run (?P<run>[0-9a-f]+) \((?P<uri>.*)\)\s*$")
MODEL_NAME = "model"  # the logged model's name within the training run
# What the pyfunc model needs besides this project (pinned to what it was logged with, so MLflow infers nothing).
REQUIREMENTS = ("torch", "transformers", "safetensors", "pandas", "mlflow")


class TrainingLogError(RuntimeError):
    """The training run cannot be logged (the exported trial is not in the store); the message says what to pass."""


def exported_from(config: Path) -> tuple[str | None, str | None]:
    """The trial run id and tracking URI a config's ``search.export`` header names, or (None, None)."""
    first = config.read_text().split("\n", 1)[0]
    m = EXPORT_HEADER.match(first)
    return (m["run"], m["uri"]) if m else (None, None)


class TrainingRun:
    """One training run in MLflow: created when training starts, ended when it finishes or fails."""

    def __init__(self, tracking_uri: str, experiment_id: str, run_name: str, links: dict[str, str],
                 register: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri, self.experiment_id, self.run_name = tracking_uri, experiment_id, run_name
        self.links, self.register = links, register
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id: str | None = None
        self.version: str | None = None  # the registered model version, after ``finished``

    @classmethod
    def for_config(cls, config: Path, tracking_uri: str | None = None, experiment: str | None = None,
                   register: str | None = None) -> TrainingRun:
        """The training run of the config file ``config``: in the store ``tracking_uri`` (else the one the export
        header names, else $MLFLOW_TRACKING_URI, else the default), linked to the trial the header names."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        trial_run, header_uri = exported_from(config)
        usable_header = header_uri if header_uri and "***" not in header_uri else None  # a masked password is gone
        uri = tracking_uri or usable_header or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        quiet_store_logs()
        client = MlflowClient(tracking_uri=uri)
        if trial_run is None:
            exp_id = _experiment(client, uri, experiment or DEFAULT_EXPERIMENT)
            return cls(uri, exp_id, f"train-{config.stem}", {}, register)
        try:
            trial = client.get_run(trial_run)
        except Exception as exc:  # MLflow raises its own types for a missing run and an unreachable store
            raise TrainingLogError(
                f"{config}: exported from MLflow run {trial_run} ({header_uri}), which {mask(uri)} does not hold "
                f"({type(exc).__name__}); pass the store it came from with --tracking-uri, or --no-mlflow") from None
        exp_id = _experiment(client, uri, experiment) if experiment else trial.info.experiment_id
        links = {"mlflow.parentRunId": trial_run, "mps.trial": trial_run, "mps.trial_name": trial.info.run_name or ""}
        search = trial.data.tags.get("mlflow.parentRunId")
        if search:
            links["mps.search"] = search
        return cls(uri, exp_id, f"train-{trial.info.run_name or trial_run[:8]}", links, register)

    @property
    def where(self) -> str:
        """The store and experiment, for the terminal (a password masked)."""
        return f"{mask(self.tracking_uri)}, experiment {self.experiment_id}"

    # --- trials.train.TrainingLog ---

    def started(self, cfg: TrialConfig, steps: int) -> None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags={
            "mps.kind": "training", "mps.status": "running", "mps.summary": cfg.summary(), **self.links})
        self.run_id = run.info.run_id
        params = {"steps": steps, "seed": cfg.seed, "methods": cfg.summary(), "task": cfg.task.name,
                  "model": cfg.model.checkpoint}
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_text(self.run_id, mask(cfg.to_yaml()), CONFIG_ARTIFACT)

    def progress(self, point: dict[str, Any]) -> None:
        if not point.get("finished"):  # the final report's metrics come with ``finished``
            self._metrics(point, int(point["step"]))

    def finished(self, out: Path, metrics: dict[str, Any]) -> None:
        assert self.run_id is not None, "started() first"
        self._metrics(metrics, int(metrics["steps"]))
        for name in ("metrics.json", TASK_FILE):
            self.client.log_artifact(self.run_id, str(out / name))
        self.client.log_artifacts(self.run_id, str(out / "adapter"), "adapter")
        self.client.set_tag(self.run_id, "mps.out", str(out.resolve()))
        if self.register:
            self.version = register_model(self.tracking_uri, self.run_id, out, self.register, metrics)
        self.client.set_tag(self.run_id, "mps.status", "finished")
        self.client.set_terminated(self.run_id, "FINISHED")

    def failed(self, error: BaseException) -> None:
        if self.run_id is None:
            return
        self.client.set_tag(self.run_id, "mps.status", "failed")
        self.client.set_tag(self.run_id, "mps.error", f"{type(error).__name__}: {error}"[:4000])
        self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def _metrics(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = _numbers(values)
        numbers.pop("step", None)
        assert self.run_id is not None
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numbers.items()])


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a report or of ``metrics.json`` (not the curve, flags or a missing merge check)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v}


def _experiment(client: Any, uri: str, name: str) -> str:
    """The id of experiment ``name``; created when missing, with its artifacts beside a sqlite store (as the
    search's own experiment is) or on the tracking server."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        root.mkdir(parents=True, exist_ok=True)
        return str(client.create_experiment(name, artifact_location=root.resolve().as_uri()))
    return str(client.create_experiment(name))


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def register_model(tracking_uri: str, run_id: str, out: Path, name: str, metrics: dict[str, Any]) -> str:
    """Log the model saved in ``out`` to run ``run_id`` as a pyfunc model and register it as a version of ``name``
    tagged with its metrics; returns the version."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    mlflow.set_tracking_uri(tracking_uri)  # the fluent model API reads the global store (and registry) URI
    source = out / "merged" if (out / "merged").is_dir() else out  # the merged model, else the base plus the adapter
    scores = _numbers({k: v for k, v in metrics.items() if k.startswith(("val_", "test_"))})
    # MLflow's own lines ("Successfully registered model ...", "Created version ...") are kept out of the terminal:
    # the command says what was registered in its own words, and MLflow's lines come back only if logging fails.
    said = io.StringIO()
    try:
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings(), contextlib.redirect_stderr(said):
            # The signature (a ``text`` column) is given, so MLflow's advice to add an input example (printed in
            # colour codes) is not for the user of this command; an example would also make MLflow load and run
            # the model here.
            warnings.filterwarnings("ignore", message=r"(?s).*An input example was not provided",
                                    category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(__file__).with_name("registered_model.py")),
                artifacts={"model": str(source)},
                registered_model_name=name, signature=ModelSignature(inputs=Schema([ColSpec("string", "text")])),
                pip_requirements=_requirements(), metadata={"form": source.name if source != out else "adapter"})
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    model_version = str(info.registered_model_version)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    for key, value in {**scores, "trainable_params": metrics.get("trainable_params", ""),
                       "form": "merged" if source != out else "adapter"}.items():
        client.set_model_version_tag(name, model_version, key, str(value))
    client.update_model_version(name, model_version, description=json.dumps(scores))
    return model_version


try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency of the search package
    PythonModel = object  # type: ignore[assignment,misc]


class TrainedModel(PythonModel):  # type: ignore[misc]
    """A ``trials.train`` output as an MLflow pyfunc model: ``predict`` takes a DataFrame with a ``text`` column (or a
    list of texts) and returns one row per input, as ``trials.predict.Predictor.predict`` does (``label``,
    ``probability``, ``probabilities`` for classification)."""

    def load_context(self, context: Any) -> None:
        from trials.predict import load_predictor

        self.predictor = load_predictor(Path(context.artifacts["model"]))

    # A DataFrame hint is one MLflow takes as it is (no schema inferred from it, no conversion): the logged signature
    # (a ``text`` column) is what validates the input, and MLflow has no "add type hints" warning to print.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        texts = list(model_input["text"]) if isinstance(model_input, pd.DataFrame) else list(model_input)
        return pd.DataFrame(self.predictor.predict([str(t) for t in texts]))
