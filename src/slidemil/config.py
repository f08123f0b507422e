"""Configuration: one pydantic model per stage, one YAML file per experiment.

A YAML file holds one section per stage (``synth:``, ``patch:``, ``extract:``, ``train:``, ...);
unknown sections and keys are refused by name. A command resolves its options as defaults <
YAML section < explicit arguments (command-line flags or keyword arguments), validates them, and
writes the resolved section next to its outputs so any result can be reproduced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

from slidemil import atomic
from slidemil.errors import ConfigError

C = TypeVar("C", bound="StageConfig")


def _check_device(value: str) -> str:
    head, _, index = value.partition(":")
    if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
        raise ValueError(f"device {value!r} must be auto, cpu, cuda or cuda:N")
    return value


def _check_shard(value: str | None) -> str | None:
    from slidemil.runner import Shard  # here: the runner imports pandas, --help should not

    Shard.parse(value)
    return value


def available_cpus() -> int:
    """CPUs this process may run on (the SLURM/cgroup allocation, not the node's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_reader_workers(cap: int = 8) -> int:
    """Reader processes for one process's DataLoader: its share of the CPUs (torchrun ranks of a
    node split them) less one for the process itself, at most ``cap``."""
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(cap, available_cpus() // ranks_here - 1))


# Option types shared by the stages that run on a device or over shards of a cohort.
Device = Annotated[str, AfterValidator(_check_device)]
ShardSpec = Annotated[str | None, AfterValidator(_check_shard)]


class StageConfig(BaseModel):
    """Base of every stage's options: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def field_help(cls, name: str) -> str:
        """A field's description with its default, for ``--help`` (kept in one place)."""
        info = cls.model_fields[name]
        default = info.default
        # A default computed at run time (default_factory) is described in the text instead.
        unset = default is None or default is PydanticUndefined
        shown = "" if unset else f" (default: {_show(default)})"
        return f"{info.description or ''}{shown}"


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(path, f"not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(path, "a config file must be a mapping of stage sections")
    return data


def build(
    model: type[C],
    *,
    section: str,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Resolve ``model`` from its YAML section (if a file is given) and explicit ``overrides``."""
    values: dict[str, Any] = {}
    if config_file is not None:
        data = read_yaml(config_file)
        unknown = sorted(set(data) - set(STAGE_SECTIONS))
        if unknown:
            raise ConfigError(
                config_file,
                f"unknown section(s) {', '.join(unknown)}",
                f"sections are {', '.join(STAGE_SECTIONS)}",
            )
        section_values = data.get(section) or {}
        if not isinstance(section_values, dict):
            raise ConfigError(config_file, f"section {section!r} must be a mapping")
        values.update(section_values)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(config_file, _summarise(e, section)) from e


def _summarise(error: ValidationError, section: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown option {key!r} in {section}")
        else:
            parts.append(f"{section}.{key}: {message}" if key else f"{section}: {message}")
    return "; ".join(parts)


def write_resolved(path: str | Path, sections: dict[str, StageConfig | dict]) -> None:
    """Write the resolved options of one or more stages as YAML, atomically."""
    data = {
        name: (cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg)
        for name, cfg in sections.items()
    }
    atomic.write_text(path, yaml.safe_dump(data, sort_keys=False))


# Sections a config file may have; each stage module defines its model under one of these names.
STAGE_SECTIONS = (
    "synth",
    "patch",
    "extract",
    "train",
    "evaluate",
    "predict",
    "heatmap",
    "view",
    "demo",
)
