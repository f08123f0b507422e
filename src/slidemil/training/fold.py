"""One fold: skip it when finished, else train it (resuming an interrupted run), then predict
its val and test parts with the best epoch's weights and write ``metrics.json``.

The parts: :mod:`~slidemil.training.fold_data` (the fold's slides, standardiser, datasets),
:mod:`~slidemil.training.epochs` (model, optimiser and the epoch loop),
:mod:`~slidemil.training.loop` (one training epoch, the loss and its auxiliary-loss hook),
:mod:`~slidemil.training.resume` (checks before continuing a checkpoint) and
:mod:`~slidemil.training.fold_results` (final predictions and metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from slidemil.training.config import TrainConfig
from slidemil.training.data import TrainData
from slidemil.training.distributed import DistContext, on_main
from slidemil.training.epochs import EpochBudget, FoldTrainer
from slidemil.training.fold_data import FoldData
from slidemil.training.fold_results import finish_fold, read_metrics
from slidemil.training.resume import resume_state

__all__ = ["EpochBudget", "train_fold"]


def train_fold(
    fold: int,
    split: pd.DataFrame,
    data: TrainData,
    config: TrainConfig,
    out: Path,
    context: DistContext,
    budget: EpochBudget,
) -> dict[str, Any] | None:
    """Train, or resume, or skip (finished) fold ``fold`` whose rows of ``splits.csv`` are
    ``split``; returns its test metrics, or None when the epoch budget ran out first."""
    fold_dir = out / f"fold_{fold}"
    done = on_main(context, lambda: read_metrics(fold_dir))
    if done is not None:
        if context.is_main and not config.quiet:
            tqdm.write(f"fold {fold}: already finished, skipped")
        return done
    if budget.exhausted:
        return None

    fold_data = FoldData.of(fold, split, data, config)
    if context.is_main:
        fold_data.warn_absent_classes(fold_dir)
    trainer = FoldTrainer.build(fold_data, fold_dir, context)
    resumed = on_main(context, lambda: resume_state(trainer.latest, trainer.static))
    if resumed is not None:
        trainer.restore(*resumed)
    if not trainer.run(budget):
        return None
    return finish_fold(fold_dir, fold_data, trainer.core, context)
