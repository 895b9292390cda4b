"""space.yaml: the search a user asks for, validated on load, and the concrete config of one trial.

``load_space(path)`` raises ``SpaceError`` whose message names every bad key path, e.g.
``space.yaml: methods.lora_in_proj.rank: 0 is below 1``. ``sample_trial(space, trial)`` turns the space into
a ``TrialConfig`` through an ``optuna.Trial``-like suggester; replaying the same params with
``optuna.trial.FixedTrial`` rebuilds the same config, which is how a Ray worker receives its trial.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from space.methods import METHOD_SPACES, MethodConfig, MethodSpace, method_config, sample_method
from space.metrics import METRICS, OBJECTIVE_METRICS, Direction
from space.params import SearchFloat, SearchInt, SearchStr, Strict, Suggester, bounded, one_of, resolve


class SpaceError(ValueError):
    """An invalid space.yaml or trial config; the message names the file and key path."""


class ModelSpec(Strict):
    checkpoint: str = "embedded"  # "embedded", a local HF checkpoint directory, or a hub model id
    tokenizer: str = "auto"  # "auto" (the checkpoint's own, else bytes), "bytes", or a tokenizer path/id
    pooling: Literal["last", "mean"] = "last"
    # Selective scan: "auto" (the project's mixer with the compiled CPU kernel, or its pure-PyTorch scan when
    # no C compiler is present; mamba-ssm's kernels on CUDA), "compiled", "torch", or transformers' own paths
    # "mambapy" and "hf_loop" (the default loop, O(L^2) in backward on CPU).
    scan: Literal["auto", "compiled", "torch", "mambapy", "hf_loop"] = "auto"


SplitName = Literal["train", "validation", "test"]


def _identity_splits() -> dict[SplitName, str]:
    return {"train": "train", "validation": "validation", "test": "test"}


class TaskSpec(Strict):
    name: Literal["digits", "pydoc_topics", "csv", "jsonl", "hf"] = "digits"
    shots_per_class: int = Field(default=10, ge=1)  # built-in tasks: size of the few-shot training split
    split_seed: int = 0  # fixes the built-in splits; never searched
    files: dict[Literal["train", "validation", "test"], str] = Field(default_factory=dict)  # csv / jsonl
    hf_dataset: str | None = None  # hf: dataset name or local path for datasets.load_dataset
    hf_config: str | None = None
    hf_splits: dict[SplitName, str] = Field(default_factory=_identity_splits)  # ours -> the dataset's names
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(default=128, ge=1)

    @model_validator(mode="after")
    def _sources(self) -> TaskSpec:
        if self.name in ("csv", "jsonl") and "train" not in self.files:
            raise ValueError(f"task {self.name!r} needs files.train")
        if self.name == "hf" and not self.hf_dataset:
            raise ValueError("task 'hf' needs hf_dataset")
        return self


# Forward-pass precision of a trial: bf16/fp16 run under torch.autocast with fp32 master weights (fp16 with
# loss scaling); the selective scan and the SSM parameters stay fp32 either way.
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class TrainingSpace(Strict):
    steps: int = Field(default=120, ge=1)  # optimiser steps of one search trial
    final_steps: int = Field(default=400, ge=1)  # the full schedule `python -m trials.train` uses
    batch_size: Annotated[SearchInt, bounded(int, ge=1)] = 16
    learning_rate: Annotated[SearchFloat, bounded(float, gt=0)] = 3e-3
    weight_decay: Annotated[SearchFloat, bounded(float, ge=0)] = 1e-4
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    eval_every: int = Field(default=30, ge=1)  # steps between validation reports (the early-stop rungs)
    head_lr_mult: Annotated[SearchFloat, bounded(float, gt=0)] = 1.0
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    precision: Annotated[SearchStr, one_of(*PRECISIONS)] = "fp32"  # fp32, bf16 or fp16 (see Precision)


class Objective(Strict):
    metric: str
    direction: Direction | None = None  # defaults to the metric's direction in space.metrics

    @model_validator(mode="after")
    def _known(self) -> Objective:
        if self.metric not in OBJECTIVE_METRICS:
            hint = " (test accuracy is reported, never optimised)" if self.metric == "test_accuracy" else ""
            raise ValueError(f"{self.metric!r} cannot be an objective{hint}; choose from {list(OBJECTIVE_METRICS)}")
        want = METRICS[self.metric][0]
        if self.direction is not None and self.direction != want:
            raise ValueError(f"{self.metric} is to be {'maximised' if want == 'max' else 'minimised'}, "
                             f"not {self.direction!r}")
        return self

    @property
    def mode(self) -> Direction:
        return METRICS[self.metric][0]


class EarlyStopping(Strict):
    enabled: bool = True
    grace_period: int = Field(default=2, ge=1)  # validation reports before a trial may be stopped
    reduction_factor: int = Field(default=2, ge=2)


class SearchSpec(Strict):
    num_trials: int = Field(default=12, ge=1)
    concurrency: int = Field(default=2, ge=1)
    seed: int = 0
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0)
    address: str | None = None  # an existing Ray cluster ("auto" or ray://host:port); None starts local Ray
    optuna_storage: str | None = None  # an Optuna RDB URL (e.g. PostgreSQL) to persist and resume the study
    study_name: str | None = None
    results_dir: str = "runs"  # Ray Tune trial directories and the default sqlite stores live here


class TrackingSpec(Strict):
    uri: str | None = None  # MLflow tracking URI; None means sqlite:///<results_dir>/mlflow.db
    experiment: str = "mamba-peft-search"


def _default_objectives() -> list[Objective]:
    return [Objective(metric="val_accuracy"), Objective(metric="trainable_params")]


class SearchSpace(Strict):
    """The whole of space.yaml."""

    name: str = "search"
    model: ModelSpec = Field(default_factory=ModelSpec)
    task: TaskSpec = Field(default_factory=TaskSpec)
    methods: dict[str, Any] = Field(default_factory=dict)
    training: TrainingSpace = Field(default_factory=TrainingSpace)
    objectives: list[Objective] = Field(default_factory=_default_objectives, min_length=1)
    search: SearchSpec = Field(default_factory=SearchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, raw: Any) -> dict[str, MethodSpace]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ValueError(f"expected a mapping of method name to settings, got {type(raw).__name__}")
        out: dict[str, MethodSpace] = {}
        for name, settings in raw.items():
            if name not in METHOD_SPACES:
                raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_SPACES)}")
            space_cls = METHOD_SPACES[name][0]
            if isinstance(settings, space_cls):
                out[name] = settings
                continue
            if isinstance(settings, bool):
                settings = {"enabled": settings}
            try:
                out[name] = space_cls.model_validate(settings or {})
            except ValidationError as exc:
                raise ValueError(_format_errors(exc, prefix=name).split("\n")[0]) from None
        return out

    @model_validator(mode="after")
    def _objectives(self) -> SearchSpace:
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: {names} names a metric twice")
        if self.training.eval_every > self.training.steps:
            raise ValueError(f"training.eval_every {self.training.eval_every} is above training.steps "
                             f"{self.training.steps}: no validation report would happen before the end")
        return self


class TrainingConfig(Strict):
    """The concrete training settings of one trial (defaults as in TrainingSpace)."""

    steps: int = Field(default=120, ge=1)
    final_steps: int = Field(default=400, ge=1)
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    eval_every: int = Field(default=30, ge=1)
    head_lr_mult: float = Field(default=1.0, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    precision: Precision = "fp32"


class TrialConfig(Strict):
    """Everything one trial needs; with its seed it fully determines the trial."""

    model: ModelSpec
    task: TaskSpec
    methods: dict[str, SerializeAsAny[MethodConfig]] = Field(default_factory=dict)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = 0

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, raw: Any) -> dict[str, MethodConfig]:
        out = {}
        for name, values in (raw or {}).items():
            if isinstance(values, MethodConfig):
                out[name] = values
            else:
                try:
                    out[name] = method_config(name, dict(values or {}))
                except KeyError as exc:
                    raise ValueError(str(exc.args[0])) from None
                except ValidationError as exc:
                    raise ValueError(_format_errors(exc, prefix=name).split("\n")[0]) from None
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "config") -> TrialConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpaceError(f"{where}: not valid YAML: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpaceError(_format_errors(exc, where=where)) from None

    def summary(self) -> str:
        if not self.methods:
            return "head only"
        parts = []
        for name, cfg in self.methods.items():
            rank = getattr(cfg, "rank", None)
            parts.append(f"{name}(r={rank})" if rank is not None else name)
        return " + ".join(parts)


def sample_trial(space: SearchSpace, trial: Suggester, seed: int | None = None) -> TrialConfig:
    methods = {}
    for name, mspace in space.methods.items():
        cfg = sample_method(name, mspace, trial)
        if cfg is not None:
            methods[name] = cfg
    t = space.training
    training = TrainingConfig(
        steps=t.steps, final_steps=t.final_steps, warmup_fraction=t.warmup_fraction, eval_every=t.eval_every,
        grad_clip=t.grad_clip,
        batch_size=resolve(t.batch_size, "training.batch_size", trial),
        learning_rate=resolve(t.learning_rate, "training.learning_rate", trial),
        weight_decay=resolve(t.weight_decay, "training.weight_decay", trial),
        head_lr_mult=resolve(t.head_lr_mult, "training.head_lr_mult", trial),
        precision=resolve(t.precision, "training.precision", trial),
    )
    return TrialConfig(model=space.model, task=space.task, methods=methods, training=training,
                       seed=space.search.seed if seed is None else seed)


def replay_trial(space: SearchSpace, params: dict[str, Any], seed: int | None = None) -> TrialConfig:
    """The TrialConfig for params an Optuna trial sampled from ``space`` (as Ray hands them to a worker)."""
    import optuna

    return sample_trial(space, optuna.trial.FixedTrial(params), seed=seed)


def _format_errors(exc: ValidationError, where: str | None = None, prefix: str | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]
        msg = err["msg"].removeprefix("Value error, ")
        nested = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg, re.S)
        if nested and err["type"] == "value_error" and "\n" not in msg:
            loc, msg = loc + [nested.group(1)], nested.group(2)
        path = ".".join(([prefix] if prefix else []) + loc)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        quiet = ("extra_forbidden", "missing", "value_error")
        shown = f" (got {value!r})" if err["type"] not in quiet and not isinstance(value, dict) else ""
        head = f"{where}: " if where else ""
        lines.append(f"{head}{path}: {msg}{shown}" if path else f"{head}{msg}")
    # Union members report the same bad value once per member; keep the first of each path.
    seen, out = set(), []
    for line in lines:
        key = line.split(": ")[0 if not where else 1]
        if key in seen:
            continue
        seen.add(key)
        out.append(line)
    return "\n".join(out)


_UNION_TAGS = {"int", "float", "bool", "str", "IntRange", "FloatRange", "Choices", "literal['search']",
               "function-after[_check(), IntRange]", "function-after[_check(), FloatRange]"}


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate space.yaml; every problem is reported with its key path."""
    path = Path(path)
    if not path.exists():
        raise SpaceError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise SpaceError(_format_errors(exc, where=path.name)) from None
