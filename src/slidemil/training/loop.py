"""The epoch loop's parts: the bag loss, schedules, early stopping, one training epoch, inference.

Schedules step once per epoch, so their state is an epoch count and resumes exactly.

The training step's hook for label-aware models (MIL model interface version 2, see
:mod:`slidemil.models.registry`): a model whose class attribute ``uses_labels`` is True is called
in training as ``model(features, mask, labels=labels)`` and returns ``(logits, attention,
auxiliary_loss)``; the step minimises ``BagLoss(logits, labels) + auxiliary_loss``. Every other
call (validation, prediction, export) is ``model(features, mask)``, for every model, so the
validation loss is the bag loss alone. A model with ``uses_coords`` also gets the batch's
``coords=`` (B, N, 2) wherever the batch has them
(:func:`slidemil.models.registry.coords_keywords`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from slidemil.models.registry import coords_keywords
from slidemil.training.config import TrainConfig


def class_weights(label_indices: list[int] | np.ndarray, n_classes: int) -> torch.Tensor:
    """``total / (n_classes × count)`` per class (1 for a class absent from the labels), so every
    class contributes equally to the loss whatever its share of the training bags."""
    counts = np.bincount(np.asarray(label_indices, dtype=int), minlength=n_classes)
    total = counts.sum()
    weights = np.where(counts > 0, total / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


class BagLoss(nn.Module):
    """Cross-entropy per bag × the weight of its class, summed and divided by the number of bags.

    Dividing by the bag count (not by the sum of the batch's weights, as
    ``nn.CrossEntropyLoss(weight=...)`` does) makes the weights act at any batch size, one bag per
    batch included; under shuffled sampling the mean weight of a bag is 1, so the loss keeps the
    scale of the unweighted one. Under DDP each rank takes this mean over its own bags and the
    gradients are averaged over ranks: the mean over all ``batch_size × world_size`` bags.
    """

    def __init__(self, weights: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean weighted loss of ``logits`` (B, C) against class indices ``labels`` (B,)."""
        per_bag = nn.functional.cross_entropy(logits, labels, reduction="none")
        if self.weights is not None:
            per_bag = per_bag * self.weights[labels]
        return per_bag.mean()


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The learning-rate schedule named by ``config.schedule``, stepped once per epoch.

    ``cosine`` decays from ``lr`` towards 0 over ``epochs``; ``warmup-cosine`` first rises
    linearly over ``warmup_epochs``; ``plateau`` halves the rate after ``patience // 2`` epochs
    without improvement of the monitored metric; ``none`` keeps ``lr``.
    """
    epochs, warmup = config.epochs, config.warmup_epochs
    if config.schedule == "plateau":
        mode = "min" if config.monitor == "loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=0.5, patience=max(1, (config.patience or 10) // 2)
        )

    def factor(epoch: int) -> float:
        if config.schedule == "none":
            return 1.0
        start = warmup if config.schedule == "warmup-cosine" else 0
        if epoch < start:
            return (epoch + 1) / (start + 1)
        progress = (epoch - start) / max(1, epochs - start)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_scheduler(scheduler, monitored: float) -> None:
    """End-of-epoch step; reduce-on-plateau needs the monitored value (NaN counts as no gain)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(monitored)
    else:
        scheduler.step()


@dataclass
class EarlyStopping:
    """Picks the best epoch by the monitored metric and decides when to stop.

    The value compared is the trailing mean of the last ``smoothing`` epochs' metric (NaN
    epochs left out): on a validation part of a few slides, where one slide moves balanced
    accuracy by several points, a single lucky epoch should not win. A tie (up to rounding) goes
    to the lower validation loss (a rate such as balanced accuracy saturates early on a small
    validation part, and the first epoch to reach it is rarely the best model). Epochs before
    ``min_epochs`` may be best only until that epoch: the first epoch from ``min_epochs`` on is
    best whatever came before, so a run that ends earlier still has a best epoch.
    ``should_stop`` after ``patience`` epochs (None: never) without a new best, counted from
    ``min_epochs`` on.
    """

    higher_is_better: bool
    patience: int | None
    min_epochs: int = 0
    smoothing: int = 1
    best: float = math.nan
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    best_loss: float = math.nan
    recent: list[float] = field(default_factory=list)  # the raw values of the last epochs

    def smoothed(self, value: float) -> float:
        """The value compared for an epoch whose raw metric is ``value``, given ``recent``."""
        window = [v for v in [*self.recent, value][-self.smoothing :] if not math.isnan(v)]
        return sum(window) / len(window) if window else math.nan

    def update(self, value: float, epoch: int, loss: float = math.nan) -> bool:
        """Record this epoch's raw monitored ``value`` and validation ``loss``; True when it is
        the new best (the first epoch, and the first from ``min_epochs`` on, always are)."""
        raw, value = value, self.smoothed(value)
        self.recent = [*self.recent, raw][-(self.smoothing - 1) :] if self.smoothing > 1 else []
        if self.best_epoch < 0 or epoch == self.min_epochs:
            improved = True
        elif math.isnan(value):
            improved = False
        elif math.isnan(self.best):
            improved = True
        elif math.isclose(value, self.best, rel_tol=1e-9, abs_tol=1e-12):  # rounding of means
            improved = not math.isnan(loss) and (
                math.isnan(self.best_loss) or loss < self.best_loss
            )
        else:
            improved = value > self.best if self.higher_is_better else value < self.best
        if improved:
            self.best, self.best_epoch, self.best_loss = value, epoch, loss
            self.epochs_without_improvement = 0
        elif epoch >= self.min_epochs:
            self.epochs_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.epochs_without_improvement >= self.patience

    @classmethod
    def for_config(cls, config: TrainConfig, **state: Any) -> EarlyStopping:
        """Early stopping as ``config`` asks (monitor, patience, min_epochs, smoothing), with
        ``state`` (``best``, ``best_epoch``, ...) when continuing a checkpoint."""
        return cls(
            config.monitor != "loss",
            config.patience,
            min_epochs=config.min_epochs,
            smoothing=config.smoothing,
            **state,
        )


def autocast(device: torch.device, enabled: bool):
    """float16 mixed precision on CUDA only (CPU autocast is slower for these small layers)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def model_uses_labels(model: nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DDP wrapper) takes ``labels=`` in training and
    returns an auxiliary loss (class attribute ``uses_labels``; absent means False)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return bool(getattr(model, "uses_labels", False))


@dataclass(frozen=True)
class EpochLosses:
    """One training epoch's mean losses per bag: ``bag`` (:class:`BagLoss`) and ``auxiliary``
    (the model's own auxiliary loss; 0 for a model without one), over ``bags`` bags."""

    bag: float
    auxiliary: float
    bags: int


def training_objective(
    model: nn.Module,
    features: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    coords: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's forward pass: ``(bag loss, auxiliary loss)``, scalar float32 tensors.

    A label-aware model (:func:`model_uses_labels`) gets ``labels`` (B,) and returns its
    auxiliary loss third, already weighted by its own option; for the others it is 0. A model
    with ``uses_coords`` gets ``coords`` (B, N, 2) when given.
    """
    extra = coords_keywords(model, coords)
    if model_uses_labels(model):
        logits, _, auxiliary = model(features, mask, labels=labels, **extra)
        auxiliary = auxiliary.float()
    else:
        logits = model(features, mask, **extra)[0]
        auxiliary = torch.zeros((), device=logits.device)
    return loss_fn(logits.float(), labels), auxiliary


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    amp: bool,
    grad_clip: float | None,
) -> EpochLosses:
    """One pass over ``loader`` minimising bag loss + the model's auxiliary loss (see
    :func:`training_objective`); returns the mean losses per bag and the number of bags.

    Under DDP the gradients are averaged over ranks in ``backward``, so one step uses
    ``batch_size × world_size`` bags.
    """
    model.train()
    # summed on the device: converting each step's loss to a float would wait for the GPU
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    count = 0
    for features, mask, labels, _, coords in loader:
        features = features.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        coords = None if coords is None else coords.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            bag_loss, auxiliary = training_objective(model, features, mask, labels, loss_fn, coords)
        scaler.scale(bag_loss + auxiliary).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        totals += torch.stack([bag_loss.detach(), auxiliary.detach()]).double() * len(labels)
        count += len(labels)
    bag, auxiliary = (totals / max(count, 1)).tolist()
    return EpochLosses(bag, auxiliary, count)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C), dataset indices (n,) and each bag's attention (its valid
    instances only), over every bag of ``loader`` with all its instances."""
    model.eval()
    probabilities, indices, attention = [], [], []
    for features, mask, _, index, coords in loader:
        features = features.to(device, non_blocking=True)
        mask_on_device = mask.to(device, non_blocking=True)
        coords = None if coords is None else coords.to(device, non_blocking=True)
        with autocast(device, amp):
            logits, weights = model(features, mask_on_device, **coords_keywords(model, coords))[:2]
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        indices.append(index.numpy())
        weights = weights.float().cpu()
        attention.extend(w[m].numpy() for w, m in zip(weights, mask, strict=True))
    if not probabilities:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64), []
    return np.concatenate(probabilities), np.concatenate(indices), attention


def mean_loss(
    probabilities: np.ndarray, label_indices: np.ndarray, weights: torch.Tensor | None
) -> float:
    """The training loss (:class:`BagLoss`) of predicted probabilities (n, C): cross-entropy per
    bag × its class weight, averaged over the n bags."""
    log_p = torch.log(torch.from_numpy(probabilities).double().clamp_min(1e-12))
    labels = torch.from_numpy(np.asarray(label_indices, dtype=np.int64))
    per_bag = nn.functional.nll_loss(log_p, labels, reduction="none")
    if weights is not None:
        per_bag = per_bag * weights.double()[labels]
    return float(per_bag.mean())
