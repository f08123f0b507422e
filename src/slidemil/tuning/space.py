"""The search space of ``slidemil sweep``: a YAML file of TrainConfig fields to search or fix.

::

    sampler: tpe            # tpe (default), random or grid
    seed: 0                 # seeds the sampler
    pruner: median          # median (default) or none
    prune_every: 5          # epochs between pruning checks
    params:
      lr: {low: 1.0e-5, high: 1.0e-3, log: true}      # a range (float: the field is a float)
      hidden_dim: {low: 64, high: 256, step: 64}       # an int range (the field is an int)
      model: {choices: [abmil, abmil-gated]}           # choices
      epochs: 20                                       # a fixed value

Every key is checked: unknown sweep options and TrainConfig fields are refused by name, and each
bound, choice and fixed value must validate as a TrainConfig value. Fields that define the outer
split (folds, seed, split fractions) or the objective (monitor) can be fixed but not searched: a
search over them would compare trials scored on different patients or metrics.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slidemil.config import read_yaml
from slidemil.errors import ConfigError
from slidemil.training.config import RUNTIME_OPTIONS, TrainConfig

# Searching these would change the patients or the metric a trial is scored on.
NOT_SEARCHABLE = frozenset({"folds", "fold", "seed", "split_fractions", "val_fraction", "monitor"})
# The sweep sets these itself.
NOT_FIXABLE = frozenset({"fold", "epoch_budget"})
GRID_MAX_POINTS = 10_000


class RangeParam(BaseModel):
    """A numeric range ``[low, high]``, on a log scale when ``log``, in steps of ``step``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> RangeParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("give log or step, not both")
        return self


class ChoiceParam(BaseModel):
    """One of ``choices`` (numbers, strings, booleans or null)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choices: list[Any] = Field(min_length=1)


class SweepSpace(BaseModel):
    """The search: sampler, pruner and the TrainConfig fields searched or fixed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler: Literal["tpe", "random", "grid"] = "tpe"
    seed: int = Field(0, ge=0, description="seeds the sampler")
    pruner: Literal["median", "none"] = "median"
    prune_every: int = Field(5, ge=1, description="epochs between pruning checks")
    startup_trials: int = Field(
        5, ge=0, description="trials before TPE models the space and before pruning starts"
    )
    heartbeat_seconds: float = Field(
        30.0, gt=0, description="a running trial's folder is touched this often; a trial silent "
        "for 3 heartbeats belongs to a killed process and is retried",
    )  # fmt: skip
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def searched(self) -> dict[str, RangeParam | ChoiceParam]:
        return {k: v for k, v in _parsed(self.params).items() if not _is_fixed(v)}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in _parsed(self.params).items() if _is_fixed(v)}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The searched values of an Optuna ``trial`` (ints for int fields)."""
        values = {}
        for name, spec in self.searched.items():
            if isinstance(spec, ChoiceParam):
                values[name] = trial.suggest_categorical(name, spec.choices)
            elif is_int_field(name):
                step = int(spec.step or 1)
                values[name] = trial.suggest_int(
                    name, int(spec.low), int(spec.high), step=step, log=spec.log
                )
            else:
                values[name] = trial.suggest_float(
                    name, spec.low, spec.high, step=spec.step, log=spec.log
                )
        return values

    def grid(self, source: str | Path | None = None) -> dict[str, list[Any]]:
        """Every searched field's grid values (for ``sampler: grid``)."""
        grid = {}
        for name, spec in self.searched.items():
            if isinstance(spec, ChoiceParam):
                grid[name] = list(spec.choices)
                continue
            if spec.step is None and not is_int_field(name):
                raise ConfigError(
                    source,
                    f"params.{name}: a grid needs choices or a range with a step",
                    f"add step: to {name}, or list its choices",
                )
            step = spec.step or 1
            count = math.floor((spec.high - spec.low) / step + 1e-9) + 1
            points = [spec.low + i * step for i in range(count)]
            grid[name] = [int(p) for p in points] if is_int_field(name) else points
        size = math.prod(len(v) for v in grid.values()) if grid else 0
        if not 0 < size <= GRID_MAX_POINTS:
            raise ConfigError(source, f"the grid has {size} points; 1 to {GRID_MAX_POINTS} fit")
        return grid

    def direction(self) -> str:
        monitor = self.fixed.get("monitor", TrainConfig.model_fields["monitor"].default)
        return "minimize" if monitor == "loss" else "maximize"


def is_int_field(name: str) -> bool:
    """True when TrainConfig's ``name`` holds an int (or int | None), not a float."""
    kinds = _field_kinds(name)
    return int in kinds and float not in kinds


def _field_kinds(name: str) -> set[Any]:
    """The types a TrainConfig field takes (``int | None`` -> {int, NoneType})."""
    annotation = TrainConfig.model_fields[name].annotation
    return set(typing.get_args(annotation)) if _is_union(annotation) else {annotation}


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _parsed(params: dict[str, Any]) -> dict[str, Any]:
    parsed = {}
    for name, value in params.items():
        if isinstance(value, dict) and "choices" in value:
            parsed[name] = ChoiceParam(**value)
        elif isinstance(value, dict) and ({"low", "high"} & set(value)):
            parsed[name] = RangeParam(**value)
        else:
            parsed[name] = value
    return parsed


def _is_fixed(value: Any) -> bool:
    return not isinstance(value, RangeParam | ChoiceParam)


def load_space(space: str | Path | dict[str, Any]) -> SweepSpace:
    """Read and check a search space (a YAML file or its dict); errors name the file and key."""
    source = None if isinstance(space, dict) else Path(space)
    data = space if isinstance(space, dict) else read_yaml(space)
    try:
        resolved = SweepSpace(**data)
        parsed = _parsed(resolved.params)
    except ValidationError as e:
        raise ConfigError(source, _summary(e)) from e
    _check_params(parsed, resolved, source)
    return resolved


def _summary(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "space"
        message = str(item["msg"]).removeprefix("Value error, ")
        unknown = item["type"] == "extra_forbidden"
        parts.append(f"unknown key {key!r}" if unknown else f"{key}: {message}")
    return "; ".join(parts)


def _check_params(parsed: dict[str, Any], space: SweepSpace, source: Path | None) -> None:
    fields = set(TrainConfig.model_fields)
    unknown = sorted(set(parsed) - fields)
    if unknown:
        raise ConfigError(
            source,
            f"params: unknown TrainConfig field(s) {', '.join(unknown)}",
            "see `slidemil train --help` for the field names",
        )
    for name, spec in parsed.items():
        if _is_fixed(spec) and name in NOT_FIXABLE:
            raise ConfigError(source, f"params.{name}: set by the sweep itself, remove it")
        if not _is_fixed(spec) and (name in NOT_SEARCHABLE or name in RUNTIME_OPTIONS):
            why = "a runtime option" if name in RUNTIME_OPTIONS else "defines the split or metric"
            raise ConfigError(source, f"params.{name} cannot be searched ({why})", "fix its value")
        if isinstance(spec, RangeParam) and not _field_kinds(name) & {int, float}:
            raise ConfigError(source, f"params.{name}: not numeric; give choices")
    if "model" in parsed:
        from slidemil.models import list_models  # here: the registry imports torch

        spec = parsed["model"]
        names = spec.choices if isinstance(spec, ChoiceParam) else [spec]
        unknown_models = [str(n) for n in names if n not in list_models()]
        if unknown_models:
            raise ConfigError(
                source,
                f"params.model: unknown MIL model(s) {', '.join(unknown_models)}",
                f"choose from {', '.join(list_models())}",
            )
    fixed = space.fixed
    candidates = [fixed]
    for name, spec in space.searched.items():
        values = spec.choices if isinstance(spec, ChoiceParam) else [spec.low, spec.high]
        if isinstance(spec, RangeParam) and is_int_field(name):
            if spec.low != int(spec.low) or spec.high != int(spec.high):
                raise ConfigError(source, f"params.{name}: an int field needs int bounds")
            values = [int(v) for v in values]
        candidates += [{**fixed, name: v} for v in values]
    for values in candidates:
        try:
            TrainConfig(**values)
        except ValidationError as e:
            raise ConfigError(source, f"params: {_summary(e)}") from e
