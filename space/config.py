"""space.yaml: the search a user asks for, validated on load, and the concrete config of one trial.

``load_space(path)`` raises ``SpaceError`` whose message names every bad key path, e.g.
``space.yaml: methods.lora_in_proj.rank: 0 is below 1``. ``sample_trial(space, trial)`` turns the space into
a ``TrialConfig`` through an ``optuna.Trial``-like suggester; replaying the same params with
``optuna.trial.FixedTrial`` rebuilds the same config, which is how a Ray worker receives its trial.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BeforeValidator, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from space.methods import METHOD_SPACES, MethodConfig, MethodSpace, PromptConfig, method_config, sample_method
from space.metrics import (
    DEFAULT_OBJECTIVES,
    OBJECTIVE_METRICS,
    TASK_METRICS,
    Direction,
    default_objectives,
    direction,
    fits_task,
    kind,
    quality_metric,
)
from space.params import (
    Choices,
    FloatRange,
    IntRange,
    SearchFloat,
    SearchInt,
    SearchStr,
    Strict,
    Suggester,
    bounded,
    one_of,
    resolve,
)
from space.secrets import expand_env


class SpaceError(ValueError):
    """An invalid space.yaml or trial config; the message names the file and key path."""


Pooling = Literal["last", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


class ModelSpec(Strict):
    """The base model of one trial."""

    # "embedded" (the shipped small pretrained Mamba; "embedded-small" and "embedded-tiny" name each shipped one), a
    # local HF checkpoint directory, or a hub model id
    checkpoint: str = "embedded"
    tokenizer: str = "auto"  # "auto" (the checkpoint's own, else bytes), "bytes", or a tokenizer path/id
    # How the classifier reads the sequence: the hidden state at the last real position, or the mean over the
    # real positions.
    pooling: Pooling = "last"
    # Selective scan: "auto" (the project's mixer with the compiled CPU kernel, or its pure-PyTorch scan when
    # no C compiler is present; mamba-ssm's kernels on CUDA), "compiled", "torch", or transformers' own paths
    # "mambapy" and "hf_loop" (the default loop, O(L^2) in backward on CPU).
    scan: Literal["auto", "compiled", "torch", "mambapy", "hf_loop"] = "auto"


class ModelSpace(ModelSpec):
    """The base model in space.yaml: as ModelSpec, with ``pooling`` searchable (``{choices: [last, mean]}``), since
    which read-out suits a task is as much a tuning question as the learning rate."""

    pooling: Annotated[SearchStr, one_of(*POOLINGS)] = "last"  # type: ignore[assignment]


SplitName = Literal["train", "validation", "test"]


def _identity_splits() -> dict[SplitName, str]:
    return {"train": "train", "validation": "validation", "test": "test"}


TaskType = Literal["classification", "causal_lm", "multiple_choice"]
TASK_TYPES: tuple[str, ...] = get_args(TaskType)

# The type of each built-in task (user data says its own with ``type``; classification when it does not).
BUILTIN_TASK_TYPES: dict[str, TaskType] = {
    "digits": "classification",
    "pydoc_topics": "classification",
    "stdlib_modules": "classification",
    "stdlib_docstrings": "causal_lm",
    "stdlib_functions": "multiple_choice",
}

# Which column roles each task type reads from user data (``task.columns``), with the default column names.
# causal_lm takes either prompt/response or Alpaca's instruction/input/output (input may be empty or absent).
COLUMN_ROLES: dict[str, dict[str, str]] = {
    "classification": {"text": "text", "label": "label"},
    "causal_lm": {"prompt": "prompt", "response": "response", "instruction": "instruction", "input": "input",
                  "output": "output"},
    "multiple_choice": {"question": "question", "choices": "choices", "answer": "answer"},
}


class TaskSpec(Strict):
    """What a trial learns: a built-in task or user data, and the task type.

    ``type``: ``classification`` (a linear head on the pooled hidden state), ``causal_lm`` (supervised fine-tuning
    on prompt/response pairs, the loss on response tokens only) or ``multiple_choice`` (each choice scored by the
    language model's log-likelihood of it given the question). Built-in tasks have a fixed type.
    """

    name: Literal["digits", "pydoc_topics", "stdlib_modules", "stdlib_docstrings", "stdlib_functions", "csv", "jsonl",
                  "hf"] = "digits"
    type: TaskType | None = None  # None: the built-in task's type, classification for user data
    shots_per_class: int = Field(default=10, ge=1)  # built-in classification tasks: size of the few-shot train split
    split_seed: int = 0  # fixes the built-in splits; never searched
    files: dict[Literal["train", "validation", "test"], str] = Field(default_factory=dict)  # csv / jsonl
    hf_dataset: str | None = None  # hf: dataset name or local path for datasets.load_dataset
    hf_config: str | None = None
    hf_splits: dict[SplitName, str] = Field(default_factory=_identity_splits)  # ours -> the dataset's names
    # Column names by role (COLUMN_ROLES); multiple_choice's ``choices`` is one list-valued column, or a list of
    # columns holding one choice each (CSV). Unset roles use the role's own name as the column name.
    columns: dict[str, str | list[str]] = Field(default_factory=dict)
    text_column: str = "text"  # classification (the same as columns.text)
    label_column: str = "label"  # classification (the same as columns.label)
    max_length: int = Field(default=128, ge=1)
    # multiple_choice: a choice's score is its summed token log-likelihood ("sum") or that divided by its token
    # count ("mean", which does not favour short choices).
    choice_scoring: Literal["sum", "mean"] = "mean"
    # causal_lm: greedy generation of up to max_new_tokens on the first exact_match_examples validation rows gives
    # val_exact_match (0 turns it off).
    max_new_tokens: int = Field(default=0, ge=0)
    exact_match_examples: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _sources(self) -> TaskSpec:
        if self.name in ("csv", "jsonl") and "train" not in self.files:
            raise ValueError(f"task {self.name!r} needs files.train")
        if self.name == "hf" and not self.hf_dataset:
            raise ValueError("task 'hf' needs hf_dataset")
        builtin = BUILTIN_TASK_TYPES.get(self.name)
        if builtin is not None and self.type is not None and self.type != builtin:
            raise ValueError(f"type: task {self.name!r} is a {builtin} task, not {self.type}")
        roles = COLUMN_ROLES[self.task_type]
        for role, column in self.columns.items():
            if role not in roles:
                raise ValueError(f"columns.{role}: not a column role of a {self.task_type} task "
                                 f"(its roles: {', '.join(roles)})")
            if isinstance(column, list) and role != "choices":
                raise ValueError(f"columns.{role}: one column name, not a list")
        # Checked on the values, not on what was set: a saved trial config writes every field out.
        if self.task_type != "multiple_choice" and self.choice_scoring != "mean":
            raise ValueError(f"choice_scoring: only a multiple_choice task scores choices, this is {self.task_type}")
        if self.task_type != "causal_lm" and self.max_new_tokens:
            raise ValueError(f"max_new_tokens: only a causal_lm task generates, this is {self.task_type}")
        return self

    @property
    def task_type(self) -> TaskType:
        return self.type or BUILTIN_TASK_TYPES.get(self.name, "classification")

    def column(self, role: str) -> str | list[str]:
        """The column that holds ``role`` in user data (classification's text/label also honour text_column and
        label_column)."""
        if role in self.columns:
            return self.columns[role]
        if role == "text":
            return self.text_column
        if role == "label":
            return self.label_column
        return COLUMN_ROLES[self.task_type][role]


# Forward-pass precision of a trial: bf16/fp16 run under torch.autocast with fp32 master weights (fp16 with
# loss scaling); the selective scan and the SSM parameters stay fp32 either way.
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class Budget(Strict):
    """The multi-fidelity training budget, in optimiser steps.

    Every trial trains on one schedule (linear warm-up, then cosine decay) sized for ``max_steps`` and is
    validated at each rung. The pruner may stop it at any rung before the last; only trials that reach
    ``max_steps`` are finished, and only finished trials make the front. ``python -m trials.train`` trains the
    same schedule, so what the search ranked is what the user trains. The rungs are geometric by default:
    ``min_steps``, ``min_steps * reduction_factor``, ... and always ``max_steps`` last.
    """

    # Defaults from docs/fidelity.md: on both built-in tasks the ranking at 480 steps agrees with 960 (Spearman
    # >= 0.9), and rungs before 120 rank configurations barely better than chance.
    min_steps: int = Field(default=120, ge=1)  # the first rung: the earliest point a trial can be pruned
    max_steps: int = Field(default=480, ge=1)  # the full budget of a trial (and of trials.train)
    reduction_factor: int = Field(default=2, ge=2)  # ratio between successive rungs
    rungs: list[int] | None = None  # explicit rung steps instead of the ladder (min_steps is then unused)

    @model_validator(mode="after")
    def _ladder(self) -> Budget:
        if self.rungs is None and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps: {self.min_steps} is above max_steps {self.max_steps}")
        if self.rungs is not None:
            if not self.rungs or any(r < 1 for r in self.rungs) or self.rungs != sorted(set(self.rungs)):
                raise ValueError(f"rungs: {self.rungs} must be distinct positive steps in increasing order")
            if self.rungs[-1] != self.max_steps:
                raise ValueError(f"rungs: the last rung {self.rungs[-1]} must be max_steps {self.max_steps}")
        return self

    def steps(self) -> list[int]:
        """The rung steps, ascending, ending at ``max_steps``."""
        if self.rungs is not None:
            return list(self.rungs)
        out, step = [], self.min_steps
        while step < self.max_steps:
            out.append(step)
            step *= self.reduction_factor
        return [*out, self.max_steps]


# Keys of earlier versions and what replaced them (an old space.yaml gets an error naming the new key).
_RENAMED = {
    "steps": "training.budget.max_steps (with training.budget.min_steps for the first rung)",
    "final_steps": "training.budget.max_steps (trials.train trains the schedule the search ranked)",
    "eval_every": "training.budget.min_steps / training.budget.rungs (validation happens at the rungs)",
}


def _refuse_renamed(raw: Any, where: str) -> Any:
    if isinstance(raw, dict):
        for key, new in _RENAMED.items():
            if key in raw:
                raise ValueError(f"{key}: was replaced by {new}")
    return raw


class TrainingSpace(Strict):
    budget: Budget = Field(default_factory=Budget)
    batch_size: Annotated[SearchInt, bounded(int, ge=1)] = 16
    learning_rate: Annotated[SearchFloat, bounded(float, gt=0)] = 3e-3
    weight_decay: Annotated[SearchFloat, bounded(float, ge=0)] = 1e-4
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    head_lr_mult: Annotated[SearchFloat, bounded(float, gt=0)] = 1.0
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    precision: Annotated[SearchStr, one_of(*PRECISIONS)] = "fp32"  # fp32, bf16 or fp16 (see Precision)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        return _refuse_renamed(raw, "training")


class Objective(Strict):
    metric: str
    direction: Direction | None = None  # defaults to the metric's direction in space.metrics

    @model_validator(mode="after")
    def _known(self) -> Objective:
        if self.metric not in OBJECTIVE_METRICS:
            hint = " (test accuracy is reported, never optimised)" if self.metric == "test_accuracy" else ""
            raise ValueError(f"{self.metric!r} cannot be an objective{hint}; choose from {list(OBJECTIVE_METRICS)}")
        want = direction(self.metric)
        if self.direction is not None and self.direction != want:
            raise ValueError(f"{self.metric} is to be {'maximised' if want == 'max' else 'minimised'}, "
                             f"not {self.direction!r}")
        return self

    @property
    def mode(self) -> Direction:
        return direction(self.metric)


PrunerName = Literal["pareto", "median", "percentile", "successive_halving", "hyperband", "none"]

# Which settings of search.pruner each pruner takes (search/pruners.py); any other one is an error.
PRUNER_OPTIONS: dict[str, tuple[str, ...]] = {
    "pareto": ("min_better", "margin", "min_peers", "warmup_steps"),
    "median": ("min_peers", "warmup_steps"),
    "percentile": ("percentile", "min_peers", "warmup_steps"),
    "successive_halving": ("reduction_factor", "min_peers", "warmup_steps"),
    "hyperband": ("reduction_factor", "n_brackets", "min_peers"),
    "none": (),
}


class PrunerSpec(Strict):
    """Which Optuna pruner stops trials at the budget rungs (search/pruners.py has the exact rules).

    ``pareto`` (the default) prunes a trial at a rung when ``min_better`` (2) trials that are no larger had reached
    a value at least ``margin`` (0.02) better at that rung, once ``min_peers`` trials have reached it: a trial can only
    make the front by beating the trials no larger than itself. ``median`` and ``percentile`` compare with a
    percentile of the rung's values, ``successive_halving`` keeps the top 1/``reduction_factor`` at each rung, and
    ``hyperband`` runs ``n_brackets`` successive-halving brackets; these four look at the quality objective only.
    """

    name: PrunerName = "pareto"
    min_better: int = Field(default=2, ge=1)  # pareto
    margin: float = Field(default=0.02, ge=0)  # pareto: in the quality objective's units
    min_peers: int = Field(default=4, ge=1)  # every pruner: trials at a rung before anything there is pruned
    warmup_steps: int = Field(default=0, ge=0)  # no pruning at rungs at or below this step
    percentile: float = Field(default=25.0, gt=0, lt=100)  # percentile: the kept top share, in %
    reduction_factor: int = Field(default=2, ge=2)  # successive_halving / hyperband
    n_brackets: int = Field(default=3, ge=1)  # hyperband

    @model_validator(mode="before")
    @classmethod
    def _named(cls, raw: Any) -> Any:
        return {"name": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _options(self) -> PrunerSpec:
        for key in sorted(self.model_fields_set - {"name"}):
            if key not in PRUNER_OPTIONS[self.name]:
                takes = ", ".join(PRUNER_OPTIONS[self.name]) or "no options"
                raise ValueError(f"{key}: the {self.name} pruner does not use it (it takes {takes})")
        return self


class Reevaluate(Strict):
    """After the search, the ``top`` most accurate front configurations are trained again with ``seeds`` further
    seeds at the full budget; the front is reported with the mean and spread over all their seeds."""

    top: int = Field(default=3, ge=0)  # 0 turns re-evaluation off
    seeds: int = Field(default=2, ge=1)


def _seconds(value: Any) -> Any:
    """``search.time_budget``: seconds, or a string with a unit: ``90s``, ``45m``, ``2h``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration; give seconds or a number with s, m or h (e.g. 45m)")
        value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ValueError(f"{value!r} is not a positive duration")
    return value


def _trainable_limit(value: Any) -> Any:
    """``search.max_trainable``: a count, or a percentage of the base model's parameters (``"2%"``)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", value)
        if match is None:
            raise ValueError(f"{value!r} is neither a parameter count nor a percentage such as '2%'")
        if not 0 < float(match.group(1)) <= 100:
            raise ValueError(f"{value!r}: a percentage must be above 0 and at most 100")
        return f"{float(match.group(1))}%"
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{value!r} is neither a parameter count (an integer >= 1) nor a percentage such as '2%'")
    return value


SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")


def _failure_limit(value: Any) -> int | float | None:
    """``search.max_failures``: a count >= 0, or a fraction of num_trials strictly between 0 and 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a count or a fraction")
    if isinstance(value, int) or float(value).is_integer() and value >= 1:
        if value < 0:
            raise ValueError(f"{value} is below 0")
        return int(value)
    if not 0 < value < 1:
        raise ValueError(f"{value} is neither a count (0, 1, 2, ...) nor a fraction between 0 and 1")
    return float(value)


BaselineName = Literal["full", "head"]
BASELINE_LABELS = {"full": "full fine-tuning", "head": "head only", "scratch": "from scratch"}


class BaselineSpec(Strict):
    """A reference trial beside the search (``search.baselines``): ``full`` fine-tunes every parameter of the
    checkpoint, ``head`` trains the task head alone (a linear probe; for a language-model task type, the base model
    as it is). It trains the full budget once, is drawn beside the front with its own marker, and is never a
    candidate of the PEFT front nor counted in its hypervolume. ``learning_rate``: its own rate; by default the
    space's when that is fixed, else the geometric middle of the searched range (``python -m trials.compare`` tunes
    each arm's rate on validation)."""

    name: BaselineName
    learning_rate: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _named(cls, raw: Any) -> Any:
        return {"name": raw} if isinstance(raw, str) else raw


class SearchSpec(Strict):
    num_trials: int = Field(default=12, ge=1)  # configurations proposed (rejected and duplicate ones included)
    concurrency: int = Field(default=2, ge=1)
    seed: int = 0
    sampler: Literal["tpe", "nsga2", "gp", "random", "grid"] = "tpe"
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    # one_stage: one search over the whole space. two_stage: MambaPEFT's recipe; stage 1 (``stage1_trials``)
    # switches methods on and off at their smallest sizes, stage 2 (the rest of num_trials) tunes the sizes and
    # rates of the set the most accurate stage-1 trial used and may drop one of its methods.
    strategy: Literal["one_stage", "two_stage"] = "one_stage"
    stage1_trials: int | None = Field(default=None, ge=1)  # two_stage; default half of num_trials
    reevaluate: Reevaluate = Field(default_factory=Reevaluate)
    baselines: list[BaselineSpec] = Field(default_factory=list)  # reference trials: full, head (BaselineSpec)
    time_budget: Annotated[float | None, BeforeValidator(_seconds)] = None  # wall clock, seconds (or "45m", "2h")
    # Stop starting trials once more than this many searched trials failed: a count (3) or a fraction of
    # num_trials (0.25). None: never (each failure is recorded and the search goes on).
    max_failures: Annotated[int | float | None, BeforeValidator(_failure_limit)] = None
    max_trainable: Annotated[int | str | None, BeforeValidator(_trainable_limit)] = None  # count or "2%"
    # Times a trial is started again from its start when the process running it dies (a lost node, a killed
    # worker), on any node still alive; an error of the trial's own (NaN loss, out of memory) is never retried.
    max_restarts: int = Field(default=2, ge=0)
    # Configurations evaluated first, as sampled parameter names and values (``python -m search.run --dry-run``
    # lists the names), e.g. {lora_in_proj.enabled: true, lora_in_proj.rank: 8, training.learning_rate: 0.005}.
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    gpus_per_trial: float = Field(default=0.0, ge=0)
    # URLs may name environment variables as ${NAME} (space/secrets.py), so passwords need not be in space.yaml.
    address: str | None = None  # an existing Ray cluster ("auto" or the head's host:port); None starts local Ray
    optuna_storage: str | None = None  # an Optuna RDB URL (e.g. PostgreSQL) to persist and resume the study
    study_name: str | None = None
    results_dir: str = "runs"  # Ray Tune trial directories and the default sqlite stores live here

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "early_stopping" in raw:
            raise ValueError("early_stopping: was replaced by search.pruner (and training.budget for the rungs)")
        return raw

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpu_share(cls, value: float) -> float:
        if value > 1 and not float(value).is_integer():
            raise ValueError(f"{value} GPUs: a trial takes a fraction of one GPU (below 1) or whole GPUs, as Ray "
                             f"schedules them")
        return value

    @field_validator("address", "optuna_storage")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        return None if value is None else expand_env(value)

    @model_validator(mode="after")
    def _stages(self) -> SearchSpec:
        if self.strategy == "two_stage":
            if self.num_trials < 2:
                raise ValueError(f"num_trials: {self.num_trials} is too few for two stages")
            if self.stage1_trials is not None and self.stage1_trials >= self.num_trials:
                raise ValueError(f"stage1_trials: {self.stage1_trials} leaves no trial of num_trials "
                                 f"{self.num_trials} for stage 2")
        elif self.stage1_trials is not None:
            raise ValueError("stage1_trials: only with strategy two_stage")
        return self

    @property
    def stage1(self) -> int:
        return self.stage1_trials or self.num_trials // 2


class TrackingSpec(Strict):
    uri: str | None = None  # MLflow tracking URI; None means sqlite:///<results_dir>/mlflow.db; ${NAME}: env

    @field_validator("uri")
    @classmethod
    def _env(cls, value: str | None) -> str | None:
        return None if value is None else expand_env(value)
    experiment: str = "mamba-peft-search"


def suffix_refusal(position: str, task_type: str) -> str:
    """A suffix prompt follows an example's last token, so it only changes the output at that position: what a
    classifier reads, but nothing a language model's loss or choice score reads (the last position predicts no
    target token)."""
    return (f"methods.prompt_tuning.position: {position} places tokens after the last token, whose output a "
            f"{task_type} task never reads; use prefix")


def position_text(position: Any) -> str:
    return str(position.choices) if isinstance(position, Choices) else repr(position)


def _default_objectives() -> list[Objective]:
    return [Objective(metric=m) for m in DEFAULT_OBJECTIVES]  # replaced by the task type's in SearchSpace


class SearchSpace(Strict):
    """The whole of space.yaml."""

    name: str = "search"
    model: ModelSpace = Field(default_factory=ModelSpace)
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

    @model_validator(mode="before")
    @classmethod
    def _task_objectives(cls, raw: Any) -> Any:
        """A space that names no objectives optimises its task type's first quality metric and the size."""
        if not isinstance(raw, dict) or raw.get("objectives") is not None:
            return raw
        try:
            task = raw.get("task")
            task_type = (task if isinstance(task, TaskSpec) else TaskSpec.model_validate(task or {})).task_type
        except ValidationError:
            return raw  # the task's own error is reported where it is validated
        return {**raw, "objectives": [{"metric": m} for m in default_objectives(task_type)]}

    @model_validator(mode="after")
    def _objectives(self) -> SearchSpace:
        task_type = self.task.task_type
        names = [o.metric for o in self.objectives]
        for i, name in enumerate(names):
            if not fits_task(name, task_type):
                fitting = [m for m in TASK_METRICS[task_type] if kind(m) == "rung"]
                raise ValueError(f"objectives.{i}.metric: a {task_type} task does not measure {name!r}; it measures "
                                 f"{', '.join(fitting)} (and sizes and costs)")
        if "val_exact_match" in names and self.task.max_new_tokens == 0:
            raise ValueError("objectives: val_exact_match needs task.max_new_tokens > 0 (the generation length)")
        prompt = self.methods.get("prompt_tuning")
        if task_type != "classification" and prompt is not None:
            position = prompt.position
            values = position.choices if isinstance(position, Choices) else [position]
            if any(v != "prefix" for v in values):
                raise ValueError(suffix_refusal(position_text(position), task_type))
        if task_type != "classification" and self.model.pooling != "last":
            raise ValueError(f"model.pooling: only a classification task pools hidden states; a {task_type} task "
                             f"reads the language model's own next-token predictions")
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: {names} names a metric twice")
        try:
            quality_metric(names)
        except ValueError as exc:
            raise ValueError(f"objectives: {exc}") from None
        self._check_enqueue()
        if self.search.sampler == "grid" and self.search.strategy == "two_stage":
            raise ValueError("search.sampler: grid cannot run strategy two_stage (each stage searches other "
                             "dimensions); use tpe, nsga2, gp or random")
        if self.search.sampler == "grid":
            continuous = [name for name, value in dimensions(self).items() if not isinstance(value, Choices)]
            if continuous:
                raise ValueError(f"search.sampler: grid needs every searched value to be a list of choices; "
                                 f"{continuous[0]} is a range")
        return self

    def _check_enqueue(self) -> None:
        """Each enqueued configuration names searched parameters with values they can take, and switches on
        (``<method>.enabled``) every method whose values it gives."""
        if self.search.enqueue and self.search.strategy == "two_stage":
            raise ValueError("search.enqueue: not with strategy two_stage (stage 1 pins every size and stage 2's "
                             "space comes from stage 1's results); use one_stage")
        known = dimensions(self)
        for i, params in enumerate(self.search.enqueue):
            where = f"search.enqueue.{i}"
            for name, value in params.items():
                if name not in known:
                    raise ValueError(f"{where}: {name!r} is not a searched parameter of this space; searched: "
                                     f"{sorted(known) or 'none'}")
                allowed = known[name]
                if isinstance(allowed, Choices) and value not in allowed.choices:
                    raise ValueError(f"{where}.{name}: {value!r} is not one of {allowed.choices}")
                if isinstance(allowed, (IntRange, FloatRange)) and (
                        isinstance(value, bool) or not isinstance(value, (int, float))
                        or not allowed.low <= value <= allowed.high):
                    raise ValueError(f"{where}.{name}: {value!r} is outside [{allowed.low}, {allowed.high}]")
                method, _, field = name.partition(".")
                if method in self.methods and field != "enabled" and f"{method}.enabled" in known \
                        and f"{method}.enabled" not in params:
                    raise ValueError(f"{where}: gives {name} but not {method}.enabled (searched); add "
                                     f"{method}.enabled: true")

    @property
    def objective_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def quality(self) -> str:
        """The objective measured at every rung (accuracy-like); the pruner and "best" use it."""
        return quality_metric(self.objective_names)


class TrainingConfig(Strict):
    """The concrete training settings of one trial (defaults as in TrainingSpace)."""

    rungs: list[int] = Field(default_factory=lambda: Budget().steps())  # validation points; the last is the budget
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    head_lr_mult: float = Field(default=1.0, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    precision: Precision = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, raw: Any) -> Any:
        return _refuse_renamed(raw, "training")

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, rungs: list[int]) -> list[int]:
        if not rungs or any(r < 1 for r in rungs) or rungs != sorted(set(rungs)):
            raise ValueError(f"{rungs} must be distinct positive steps in increasing order")
        return rungs

    @property
    def max_steps(self) -> int:
        return self.rungs[-1]


class TrialConfig(Strict):
    """Everything one trial needs; with its seed it fully determines the trial."""

    model: ModelSpec
    task: TaskSpec
    methods: dict[str, SerializeAsAny[MethodConfig]] = Field(default_factory=dict)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = 0
    # A reference trial instead of PEFT (trials/run.py): full fine-tuning, the head alone, or the
    # architecture trained from scratch. A baseline has no methods.
    baseline: Literal["full", "head", "scratch"] | None = None

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

    @model_validator(mode="after")
    def _baseline_alone(self) -> TrialConfig:
        if self.baseline is not None and self.methods:
            raise ValueError(f"baseline: a {self.baseline} baseline takes no methods, got {', '.join(self.methods)}")
        return self

    @model_validator(mode="after")
    def _prompt_fits_task(self) -> TrialConfig:
        prompt = self.methods.get("prompt_tuning")
        task_type = self.task.task_type
        if task_type != "classification" and isinstance(prompt, PromptConfig) and prompt.position != "prefix":
            raise ValueError(suffix_refusal(repr(prompt.position), task_type))
        return self

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
        if self.baseline is not None:
            return f"baseline: {BASELINE_LABELS[self.baseline]}"
        if not self.methods:
            return "head only" if self.task.task_type == "classification" else "base model (nothing trained)"
        parts = []
        for name, cfg in self.methods.items():
            rank = getattr(cfg, "rank", None)
            parts.append(f"{name}(r={rank})" if rank is not None else name)
        return " + ".join(parts)


class _Middle:
    """A Suggester that answers every searched value with its middle: the first choice, or the (geometric, for a
    log range) midpoint of a range."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        mid = math.sqrt(low * high) if log else (low + high) / 2
        return low + round((mid - low) / step) * step

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        return math.sqrt(low * high) if log else (low + high) / 2

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return list(choices)[0]


def baseline_trial(space: SearchSpace, spec: BaselineSpec) -> TrialConfig:
    """The TrialConfig of a ``search.baselines`` entry: no methods, the space's training settings at their middle
    (``_Middle``), the baseline's own learning rate when it has one."""
    base = sample_trial(space.model_copy(update={"methods": {}}), _Middle())
    training = base.training.model_copy(update={"learning_rate": spec.learning_rate or base.training.learning_rate})
    return TrialConfig.model_validate({**base.model_dump(), "training": training.model_dump(), "baseline": spec.name})


def sample_trial(space: SearchSpace, trial: Suggester, seed: int | None = None) -> TrialConfig:
    """The one validated TrialConfig for what ``trial`` suggests; the worker receives this object as it is."""
    methods = {}
    for name, mspace in space.methods.items():
        cfg = sample_method(name, mspace, trial)
        if cfg is not None:
            methods[name] = cfg
    t = space.training
    training = TrainingConfig(
        rungs=t.budget.steps(), warmup_fraction=t.warmup_fraction, grad_clip=t.grad_clip,
        batch_size=resolve(t.batch_size, "training.batch_size", trial),
        learning_rate=resolve(t.learning_rate, "training.learning_rate", trial),
        weight_decay=resolve(t.weight_decay, "training.weight_decay", trial),
        head_lr_mult=resolve(t.head_lr_mult, "training.head_lr_mult", trial),
        precision=resolve(t.precision, "training.precision", trial),
    )
    model = ModelSpec(**{**space.model.model_dump(), "pooling": resolve(space.model.pooling, "model.pooling", trial)})
    return TrialConfig(model=model, task=space.task, methods=methods, training=training,
                       seed=space.search.seed if seed is None else seed)


class _Recorder:
    """A Suggester that records every dimension a space can search: each ``enabled`` switch answers True, so the
    fields of every method that may be on are visited."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.seen: dict[str, Any] = {}

    def _value(self, name: str) -> Any:
        section, _, field = name.rpartition(".")
        if section == "training":
            return getattr(self.space.training, field)
        if section == "model":
            return getattr(self.space.model, field)
        return getattr(self.space.methods[section], field)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        self.seen[name] = self._value(name)
        return low

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float:
        self.seen[name] = self._value(name)
        return low

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        if name.endswith(".enabled"):
            self.seen[name] = Choices(choices=[True, False])
            return True
        self.seen[name] = self._value(name)
        return choices[0]


def dimensions(space: SearchSpace) -> dict[str, Choices | IntRange | FloatRange]:
    """Every searched parameter of the space, by the name Optuna records it under, with its range or choices."""
    recorder = _Recorder(space)
    sample_trial(space, recorder)
    return recorder.seen


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


def with_local_paths(space: SearchSpace, base: Path) -> SearchSpace:
    """``space`` with its relative local paths made absolute against ``base`` (the directory the search is started
    from): the data files, and the checkpoint, tokenizer and ``hf_dataset`` where ``base`` holds them (otherwise they
    are hub ids). Trials run elsewhere: Ray Tune starts each in its own directory, a cluster's workers in theirs."""

    def local(value: str) -> str:
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~user of no such user: left for the loader to name
            return value
        if path.is_absolute():
            return str(path)  # ~ expanded
        return str((base / path).resolve()) if (base / path).exists() else value

    task = space.task.model_copy(update={
        "files": {split: str((base / Path(f).expanduser()).resolve()) for split, f in space.task.files.items()},
        "hf_dataset": local(space.task.hf_dataset) if space.task.hf_dataset else None})
    checkpoint, tokenizer = space.model.checkpoint, space.model.tokenizer
    model = space.model.model_copy(update={
        "checkpoint": checkpoint if checkpoint.startswith("embedded") else local(checkpoint),
        "tokenizer": tokenizer if tokenizer in ("auto", "bytes") else local(tokenizer)})
    return space.model_copy(update={"task": task, "model": model})


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate space.yaml; every problem is reported with its key path."""
    path = Path(path)
    if not path.exists():
        raise SpaceError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML: {exc}") from None
    if not raw:
        raise SpaceError(f"{path}: the space is empty; give at least the methods to search (see space.yaml, and "
                         "space/config.py for every key)")
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise SpaceError(_format_errors(exc, where=path.name)) from None
