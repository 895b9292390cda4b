"""Searchable values in space.yaml: a constant, ``{choices: [...]}`` or ``{low, high, log, step}``."""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    """Unknown keys are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Choices(Strict):
    choices: list[Any] = Field(min_length=1)


class IntRange(Strict):
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low < 1:
            raise ValueError(f"a log range needs low >= 1, got {self.low}")
        if self.step < 1:
            raise ValueError(f"step {self.step} is below 1")
        if self.log and self.step != 1:
            raise ValueError("a log range cannot have a step")
        return self


class FloatRange(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


def _searchable(kind: type) -> Any:
    """Turn a mapping into Choices / IntRange / FloatRange by its keys, so errors speak of the one meant."""

    def parse(value: Any) -> Any:
        if not isinstance(value, dict):
            if kind is str:
                if not isinstance(value, str):
                    raise ValueError(f"expected a string or a mapping with 'choices', got {value!r}")
                return value
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"expected true, false or a mapping with 'choices', got {value!r}")
                return value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and isinstance(value, float)):
                raise ValueError(f"expected {kind.__name__} or a mapping with 'choices' or 'low'/'high', "
                                 f"got {value!r}")
            return kind(value)
        keys = set(value)
        if kind is str and "choices" not in keys:
            raise ValueError(f"a searched string needs 'choices', got keys {sorted(keys)}")
        try:
            if "choices" in keys:
                return Choices.model_validate(value)
            if {"low", "high"} <= keys:
                return (IntRange if kind is int else FloatRange).model_validate(value)
        except ValidationError as exc:
            raise ValueError("; ".join(
                f"{'.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors())) from None
        raise ValueError(f"a searched value needs 'choices' or both 'low' and 'high', got keys {sorted(keys)}")

    return BeforeValidator(parse)


SearchInt = Annotated[int | IntRange | Choices, _searchable(int)]
SearchFloat = Annotated[float | FloatRange | Choices, _searchable(float)]
SearchBool = Annotated[bool | Choices, _searchable(bool)]
SearchStr = Annotated[str | Choices, _searchable(str)]  # pair with ``one_of`` to name the allowed values

SEARCHABLE = (Choices, IntRange, FloatRange)


class Suggester(Protocol):
    """The part of ``optuna.Trial`` the space uses (``optuna.trial.FixedTrial`` replays a sample)."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def is_searched(value: Any) -> bool:
    return isinstance(value, SEARCHABLE)


def resolve(value: Any, name: str, trial: Suggester) -> Any:
    """A concrete value: constants pass through, searchable values are suggested under ``name``."""
    if isinstance(value, Choices):
        return trial.suggest_categorical(name, value.choices)
    if isinstance(value, IntRange):
        return trial.suggest_int(name, value.low, value.high, step=value.step, log=value.log)
    if isinstance(value, FloatRange):
        return trial.suggest_float(name, value.low, value.high, log=value.log)
    return value


def candidates(value: Any) -> list[Any]:
    """Values a field can take that bounds can be checked on (range ends, every choice, or the constant)."""
    if isinstance(value, Choices):
        return list(value.choices)
    if isinstance(value, (IntRange, FloatRange)):
        return [value.low, value.high]
    return [value]


def check_bounds(value: Any, *, ge: float | None = None, le: float | None = None, gt: float | None = None) -> Any:
    for v in candidates(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if ge is not None and v < ge:
            raise ValueError(f"{v} is below {ge}")
        if gt is not None and v <= gt:
            raise ValueError(f"{v} must be above {gt}")
        if le is not None and v > le:
            raise ValueError(f"{v} is above {le}")
    return value


def _typed(value: Any, kind: type) -> Any:
    for v in candidates(value):
        ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ValueError(f"choice {v!r} is not {'an' if kind is int else 'a'} {kind.__name__}")
    return value


def bounded(kind: type, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """Validator for a searchable field: every value it can take is a ``kind`` within the bounds."""
    return AfterValidator(lambda v: check_bounds(_typed(v, kind), ge=ge, gt=gt, le=le))


def _allowed(value: Any, allowed: tuple[str, ...]) -> Any:
    prefix = "choice " if isinstance(value, Choices) else ""
    for v in candidates(value):
        if not isinstance(v, str) or v not in allowed:
            raise ValueError(f"{prefix}{v!r} is not one of {', '.join(allowed)}")
    return value


def one_of(*allowed: str) -> Any:
    """Validator for a searchable string field: the constant, or every choice, is one of ``allowed``."""
    return AfterValidator(lambda v: _allowed(v, allowed))
