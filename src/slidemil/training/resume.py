"""Resuming a fold: read the interrupted run's ``checkpoint_latest.pt`` and history, and refuse
one whose options, process count or split differ from this run's (the epochs would mix two
experiments)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from slidemil.errors import ConfigError
from slidemil.training.checkpoint import load_checkpoint
from slidemil.training.config import RUNTIME_OPTIONS


def resume_state(
    latest: Path, static: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The interrupted run's checkpoint (on the CPU) and its history rows, or None when there is
    none. ``static`` is this run's checkpoint identity (``config``, ``world_size``, ``split``)."""
    if not latest.is_file():
        return None
    state = load_checkpoint(latest, "cpu")
    check_resumable(latest, state, static)
    return state, _read_history(latest.parent / "history.csv", state["epoch"])


def check_resumable(path: Path, state: dict[str, Any], static: dict[str, Any]) -> None:
    """Raise ConfigError when checkpoint ``state`` at ``path`` cannot continue this run: another
    result-changing option (``model_options`` included), process count or split."""
    saved = {k: v for k, v in state["config"].items() if k not in RUNTIME_OPTIONS}
    now = {k: v for k, v in static["config"].items() if k not in RUNTIME_OPTIONS}
    changed = sorted(k for k in now if k in saved and saved[k] != now[k])
    if changed:
        raise ConfigError(
            path,
            f"cannot resume: option(s) {', '.join(changed)} differ from the interrupted run",
            "use the same options, or a new --out folder",
        )
    saved_world, world = state.get("world_size"), static["world_size"]
    if saved_world is not None and int(saved_world) != world:  # None: written before it was kept
        raise ConfigError(
            path,
            f"cannot resume: the interrupted run used {saved_world} process(es), this one "
            f"{world} (shards, effective batch and random draws would change)",
            f"resume with {saved_world} process(es) (torchrun --nproc_per_node), or a new --out "
            "folder",
        )
    if state["split"] != static["split"]:
        raise ConfigError(
            path,
            "cannot resume: the split differs from the interrupted run (cohort or features "
            "changed)",
            "use a new --out folder",
        )


def _read_history(path: Path, last_epoch: int) -> list[dict[str, Any]]:
    # history.csv is written before checkpoint_latest.pt, so it may hold one epoch more
    if not path.is_file():
        return []
    frame = pd.read_csv(path)
    return frame[frame["epoch"] <= last_epoch].to_dict("records")
