"""One trial of a sweep: train the trial's options on each outer fold's training part, score it on
that fold's validation part, never on its test part.

For each outer fold k the sweep writes a development work folder ``dev/fold_<k>/``: a cohort of
fold k's training and validation slides only (a ``split`` column says which), with the work's
feature folder linked in. The test slides are not in it, so a trial cannot train, stop early,
choose an epoch or be scored on them. A trial trains one ordinary run folder per outer fold,
``trials/<nnnn>/fold_<k>/``, in chunks of ``prune_every`` epochs (``epoch_budget``), reports the
validation metric after each chunk so Optuna can prune it, and resumes like any run when its
process was killed. The objective is the mean over folds of the monitored validation metric of
each fold's best epoch.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil import atomic
from slidemil.config import write_resolved
from slidemil.errors import ConfigError
from slidemil.training.config import TrainConfig

HEARTBEAT = "heartbeat"
TRIAL_FOLDER_ATTR = "folder"


@dataclass(frozen=True)
class DevFold:
    """An outer fold's development work folder (training + validation slides, no test)."""

    fold: int
    work: Path


def write_dev_folds(
    work: Path, sweep_dir: Path, splits: pd.DataFrame, encoder: str
) -> list[DevFold]:
    """One development work folder per outer fold of ``splits`` (idempotent: every process of a
    sweep may call it; the files are written atomically and have the same content)."""
    cohort = pd.read_csv(work / "cohort.csv", dtype=str, keep_default_na=False)
    features = (work / "features" / encoder).resolve()
    folds = []
    for fold in sorted(int(k) for k in splits["fold"].unique()):
        rows = splits[(splits["fold"] == fold) & (splits["part"] != "test")]
        part = dict(zip(rows["slide_id"], rows["part"], strict=True))
        dev = cohort[cohort["slide_id"].isin(part)].copy()
        dev["split"] = dev["slide_id"].map(part)
        root = sweep_dir / "dev" / f"fold_{fold}"
        atomic.write_csv(root / "cohort.csv", dev)
        _link(root / "features" / encoder, features)
        folds.append(DevFold(fold, root))
    return folds


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target, target_is_directory=True)
    except FileExistsError:
        if link.resolve() != target:
            raise ConfigError(link, f"links to {link.resolve()}, not {target}") from None


class Heartbeat:
    """Touches ``folder/heartbeat`` every ``seconds`` while a trial runs (a thread)."""

    def __init__(self, folder: Path, seconds: float):
        self.path = folder / HEARTBEAT
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds):
            self.path.touch()


def monitored_column(monitor: str) -> str:
    return "val_loss" if monitor == "loss" else f"val_{monitor}"


def run_trial(
    trial: Any,
    config: TrainConfig,
    dev_folds: list[DevFold],
    folder: Path,
    prune_every: int,
    heartbeat_seconds: float,
) -> float:
    """Train and score ``config`` on every development fold; the mean validation metric.

    Raises ``optuna.TrialPruned`` when the pruner stops the trial after a chunk of epochs.
    """
    import optuna

    from slidemil.training import train

    write_resolved(folder / "config.yaml", {"train": config})
    column = monitored_column(config.monitor)
    fold_config = config.model_copy(update={"folds": 1, "fold": None, "quiet": True})
    values: list[float] = []
    with Heartbeat(folder, heartbeat_seconds):
        for index, dev in enumerate(dev_folds):
            run_dir = folder / f"fold_{dev.fold}"
            chunk = fold_config.model_copy(update={"epoch_budget": prune_every})
            while True:
                result = train(dev.work, run_dir, chunk)
                history = run_dir / "fold_0" / "history.csv"
                if history.is_file():
                    last = pd.read_csv(history).iloc[-1]
                    step = index * config.epochs + int(last["epoch"])
                    value = float(last[column])
                    if not math.isnan(value):
                        trial.report(value, step)
                    if not result.finished and trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at fold {dev.fold}, epoch {step}")
                if result.finished:
                    break
            metrics = json.loads((run_dir / "fold_0" / "metrics.json").read_text("utf-8"))
            best = metrics.get("best_val")
            values.append(math.nan if best is None else float(best))
            trial.set_user_attr("fold_values", values)
    trial.set_user_attr("value_std", float(np.std(values)))
    return float(np.mean(values))
