"""What a sweep leaves besides its trial folders: ``trials.csv``, ``best.yaml`` and three plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil import atomic
from slidemil.config import write_resolved
from slidemil.training.config import TrainConfig
from slidemil.tuning.space import RangeParam, SweepSpace
from slidemil.tuning.trial import TRIAL_FOLDER_ATTR

BASE_COLUMNS = ["trial", "state", "value", "value_std", "n_folds", "seconds", "folder", "error"]


def trials_table(study: Any, space: SweepSpace) -> pd.DataFrame:
    """One row per trial: number, state, objective, its std over folds, seconds, parameters."""
    names = list(space.searched)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        seconds = None
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)
        folds = trial.user_attrs.get("fold_values") or []
        row = {
            "trial": trial.number,
            "state": trial.state.name,
            # the objective; a pruned trial has none (Optuna keeps its last report there)
            "value": trial.value if trial.values and trial.state.name == "COMPLETE" else None,
            "value_std": trial.user_attrs.get("value_std"),
            "n_folds": len(folds),
            "seconds": seconds,
            "folder": trial.user_attrs.get(TRIAL_FOLDER_ATTR),
            "error": trial.user_attrs.get("error"),
        }
        row.update({name: trial.params.get(name) for name in names})
        rows.append(row)
    return pd.DataFrame(rows, columns=BASE_COLUMNS + names)


def write_best(path: Path, space: SweepSpace, params: dict[str, Any]) -> TrainConfig:
    """``best.yaml``: the best trial's full ``train`` section (a valid ``--config`` file)."""
    config = TrainConfig(**space.fixed, **params)
    write_resolved(path, {"train": config})
    return config


def write_plots(out: Path, table: pd.DataFrame, study: Any, space: SweepSpace) -> list[Path]:
    """``history.png``, ``importances.png`` and ``slice.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maximize = space.direction() == "maximize"
    done = table[table["state"] == "COMPLETE"]
    label = _objective_label(space)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(done["trial"], done["value"], s=18, label="completed trial")
    pruned = table[table["state"] == "PRUNED"]
    if len(pruned):
        ax.scatter(pruned["trial"], [_last_value(study, t) for t in pruned["trial"]], marker="x",
                   color="grey", label="pruned (last reported)")  # fmt: skip
    if len(done):
        best = done["value"].cummax() if maximize else done["value"].cummin()
        ax.step(done["trial"], best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=label, title="Optimisation history")
    ax.legend(loc="best", fontsize=8)
    paths.append(_save(fig, out / "history.png"))

    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.5 * len(space.searched) + 1)))
    importances = _importances(study)
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA, sums to 1)", title="Parameter importances")
    else:
        ax.text(0.5, 0.5, "needs two or more completed trials\nwith different values",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.set_axis_off()
    paths.append(_save(fig, out / "importances.png"))

    names = list(space.searched)
    columns = max(1, min(3, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        spec = space.searched[name]
        values = done[name]
        if isinstance(spec, RangeParam):
            ax.scatter(values.astype(float), done["value"], c=done["trial"], cmap="viridis", s=18)
            if spec.log:
                ax.set_xscale("log")
        else:
            labels = [str(c) for c in spec.choices]
            positions = [labels.index(str(v)) for v in values]
            ax.scatter(positions, done["value"], c=done["trial"], cmap="viridis", s=18)
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set(xlabel=name, ylabel=f"validation {_monitor(space)}")
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    fig.suptitle("Slice plot: objective per parameter (colour: trial number)")
    paths.append(_save(fig, out / "slice.png", top=0.9))
    return paths


def _monitor(space: SweepSpace) -> str:
    return str(space.fixed.get("monitor", TrainConfig.model_fields["monitor"].default))


def _objective_label(space: SweepSpace) -> str:
    return f"validation {_monitor(space)} (mean over folds)"


def _last_value(study: Any, number: int) -> float:
    values = study.trials[number].intermediate_values
    return values[max(values)] if values else np.nan


def _importances(study: Any) -> dict[str, float]:
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. every trial with one value
        return {}


def _save(fig: Any, path: Path, top: float = 1.0) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0, 1, top))
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
