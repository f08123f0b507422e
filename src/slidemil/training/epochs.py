"""The epoch loop of one fold: train an epoch, validate, pick the best epoch, save checkpoints.

Every random draw of an epoch (the order of the bags, the instances sampled from each, dropout)
depends only on ``(seed, fold, epoch, rank)``, and the checkpoint holds the model, optimizer,
scheduler and scaler states, so a run resumed from ``checkpoint_latest.pt`` repeats the epochs of
an uninterrupted run exactly (bit for bit on CPU; on GPU up to non-deterministic CUDA kernels).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from slidemil import __version__, atomic
from slidemil.evaluation.metrics import SCALAR_METRICS
from slidemil.models import build_model, get_model_entry
from slidemil.training.bags import BagDataset
from slidemil.training.checkpoint import restore_rng_state, rng_state, save_checkpoint
from slidemil.training.ddp import wrap_ddp
from slidemil.training.distributed import (
    DistContext,
    gather_predictions,
    mean_over_ranks,
    on_main,
)
from slidemil.training.fold_data import FoldData, inference_shard
from slidemil.training.loop import (
    BagLoss,
    EarlyStopping,
    build_scheduler,
    class_weights,
    mean_loss,
    model_uses_labels,
    predict,
    step_scheduler,
    train_one_epoch,
)
from slidemil.training.predictions import part_metrics
from slidemil.training.sampling import training_sampler


@dataclass
class EpochBudget:
    """Epochs this invocation may still train, over all its folds (None: no limit)."""

    remaining: int | None

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def spend(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1


def seed_for(*keys: int) -> int:
    """A 64-bit torch seed from integer keys, well mixed (nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


@dataclass
class FoldTrainer:
    """One fold's model, optimisation state, data loaders and history; :meth:`run` trains it.

    ``model`` is what the epochs call (``core`` in DDP under torchrun); ``static`` is what every
    checkpoint of the fold records besides the changing states (and what a resume must match).
    """

    fold_data: FoldData
    fold_dir: Path
    context: DistContext
    core: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: BagLoss
    weights: torch.Tensor | None
    stopper: EarlyStopping
    train_set: BagDataset
    val_set: BagDataset
    sampler: Sampler
    train_loader: DataLoader
    val_loader: DataLoader
    static: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0

    @classmethod
    def build(cls, fold_data: FoldData, fold_dir: Path, context: DistContext) -> FoldTrainer:
        """A fresh fold: initial weights from ``(seed, fold)``, the same on every rank."""
        config, fold, data = fold_data.config, fold_data.fold, fold_data.data
        names = fold_data.class_names
        device = context.device
        train_set, val_set = fold_data.dataset("train", True), fold_data.dataset("val", False)
        # Each rank takes every world_size-th bag of one order per epoch, all ranks the same
        # number of steps (DDP needs that).
        sampler = training_sampler(
            train_set, train_set.labels, config, fold,
            world_size=context.world_size, rank=context.rank,
        )  # fmt: skip
        train_loader = fold_data.loader(train_set, device, sampler, config.batch_size)
        val_loader = fold_data.loader(val_set, device, inference_shard(val_set, context))

        model_kwargs = config.model_kwargs(get_model_entry(config.model).defaults())
        torch.manual_seed(seed_for(config.seed, fold))  # the same initial weights on every rank
        core = build_model(
            config.model, in_dim=data.feature_dim, n_classes=len(names), **model_kwargs
        ).to(device)
        model = (
            wrap_ddp(core, context, data.feature_dim, len(names)) if context.distributed else core
        )
        optimizer = torch.optim.AdamW(
            core.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        use_amp = config.amp and device.type == "cuda"
        weights = class_weights(train_set.labels, len(names)) if config.class_weights else None
        standardizer = fold_data.standardizer
        static = {
            "model_name": config.model,
            "model_kwargs": model_kwargs,
            "monitor": config.monitor,
            "config": config.model_dump(mode="json"),
            "class_names": names,
            "encoder": data.encoder,
            "feature_dim": data.feature_dim,
            "standardization": None if standardizer is None else standardizer.to_state(),
            "class_weights": None if weights is None else weights.tolist(),
            "split": fold_data.parts,
            "fold": fold,
            # another process count changes the shards, the effective batch and the dropout seeds
            "world_size": context.world_size,
            "slidemil_version": __version__,
        }
        return cls(
            fold_data=fold_data,
            fold_dir=fold_dir,
            context=context,
            core=core,
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, config),
            scaler=torch.amp.GradScaler(device.type, enabled=use_amp),
            loss_fn=BagLoss(None if weights is None else weights.to(device)),
            weights=weights,
            stopper=EarlyStopping.for_config(config),
            train_set=train_set,
            val_set=val_set,
            sampler=sampler,
            train_loader=train_loader,
            val_loader=val_loader,
            static=static,
        )

    @property
    def latest(self) -> Path:
        return self.fold_dir / "checkpoint_latest.pt"

    @property
    def use_amp(self) -> bool:
        return self.fold_data.config.amp and self.context.device.type == "cuda"

    def restore(self, state: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Continue from an interrupted run's checkpoint ``state`` and its ``history`` rows."""
        self.core.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        if self.use_amp and state["scaler_state"]:  # a CPU run resumed on GPU has no scaler state
            self.scaler.load_state_dict(state["scaler_state"])
        restore_rng_state(state["rng_state"])
        self.stopper = EarlyStopping.for_config(
            self.fold_data.config,
            best=state["best_metric"],
            best_epoch=state["best_epoch"],
            epochs_without_improvement=state["epochs_without_improvement"],
            best_loss=state.get("best_val_loss", math.nan),
            recent=list(state.get("recent_monitored", [])),
        )
        self.history = history
        self.start_epoch = state["epoch"] + 1

    def run(self, budget: EpochBudget) -> bool:
        """Train the remaining epochs until early stopping or the end; False when ``budget``
        ran out first (the fold is not finished)."""
        config, context = self.fold_data.config, self.context
        bar = tqdm(
            total=config.epochs, initial=self.start_epoch, desc=f"fold {self.fold_data.fold}",
            unit="epoch", disable=config.quiet or not context.is_main, dynamic_ncols=True,
        )  # fmt: skip
        try:
            for epoch in range(self.start_epoch, config.epochs):
                if self.stopper.should_stop:
                    break
                if budget.exhausted:
                    return False
                budget.spend()
                shown = self._epoch(epoch)
                bar.set_postfix(shown)
                bar.update(1)
        finally:
            bar.close()
        return True

    def _epoch(self, epoch: int) -> dict[str, str]:
        """Train, validate and checkpoint one epoch; returns the progress bar's figures."""
        config, context, device = self.fold_data.config, self.context, self.context.device
        names = self.fold_data.class_names
        started = time.perf_counter()
        torch.manual_seed(seed_for(config.seed, self.fold_data.fold, epoch, context.rank))
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        losses = train_one_epoch(
            self.model, self.train_loader, self.optimizer, self.loss_fn, self.scaler, device,
            amp=self.use_amp, grad_clip=config.grad_clip,
        )  # fmt: skip
        train_loss = mean_over_ranks(losses.bag, losses.bags, context)
        probabilities, indices = predict_part(
            self.core, self.val_loader, device, self.use_amp, context
        )
        labels = np.asarray(self.val_set.labels)[indices]
        # absent classes were warned about once for the fold
        metrics = part_metrics(labels, probabilities, names, warn_absent=False)
        val_loss = mean_loss(probabilities, labels, self.weights)  # the bag loss only
        monitored = val_loss if config.monitor == "loss" else metrics[config.monitor]
        lr = self.optimizer.param_groups[0]["lr"]
        step_scheduler(self.scheduler, monitored)
        selected = self.stopper.smoothed(monitored)  # what picks the best epoch
        improved = self.stopper.update(monitored, epoch, val_loss)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
        if model_uses_labels(self.core):
            row["train_auxiliary_loss"] = mean_over_ranks(losses.auxiliary, losses.bags, context)
        self.history.append(
            {
                **row,
                "val_loss": val_loss,
                **{f"val_{k}": metrics[k] for k in SCALAR_METRICS},
                "val_selected": selected,
                "lr": lr,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        # only rank 0 saves: the other ranks need not copy the states
        snapshot = self._snapshot(epoch) if context.is_main else None
        on_main(context, partial(_save_epoch, self.fold_dir, self.history, snapshot, improved))
        return {
            "train_loss": f"{train_loss:.3f}",
            "val_loss": f"{val_loss:.3f}",
            config.monitor: f"{monitored:.3f}",
        }

    def _snapshot(self, epoch: int) -> dict[str, Any]:
        return {
            **self.static,
            "model_state": self.core.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "rng_state": rng_state(),
            "epoch": epoch,
            "best_metric": self.stopper.best,
            "best_epoch": self.stopper.best_epoch,
            "epochs_without_improvement": self.stopper.epochs_without_improvement,
            "best_val_loss": self.stopper.best_loss,
            "recent_monitored": list(self.stopper.recent),
        }


def predict_part(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool, context: DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and dataset indices of every bag of a part, the same on every rank."""
    probabilities, indices, _ = predict(model, loader, device, amp=amp)
    return gather_predictions(probabilities, indices, context)


def _save_epoch(
    fold_dir: Path, history: list[dict[str, Any]], state: dict[str, Any], improved: bool
) -> None:
    atomic.write_csv(fold_dir / "history.csv", pd.DataFrame(history))
    if improved:
        save_checkpoint(fold_dir / "checkpoint_best.pt", state)
    save_checkpoint(fold_dir / "checkpoint_latest.pt", state)
