"""One fold: train (or resume, or skip when finished), then predict val and test with the best
epoch's weights and write ``metrics.json``.

Every random draw of an epoch (the order of the bags, the instances sampled from each, dropout)
depends only on ``(seed, fold, epoch, rank)``, and the checkpoint holds the model, optimizer,
scheduler and scaler states, so a run resumed from ``checkpoint_latest.pt`` repeats the epochs of
an uninterrupted run exactly (bit for bit on CPU; on GPU up to non-deterministic CUDA kernels).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from slidemil import __version__, atomic
from slidemil.errors import ConfigError
from slidemil.evaluation.metrics import SCALAR_METRICS, AbsentClassWarning, json_number
from slidemil.models import build_model, get_model_entry
from slidemil.training.bags import BagDataset, Standardizer, fit_standardizer, pad_bags
from slidemil.training.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from slidemil.training.config import RUNTIME_OPTIONS, TrainConfig
from slidemil.training.distributed import (
    DistContext,
    gather_predictions,
    mean_over_ranks,
    on_main,
)
from slidemil.training.loop import (
    BagLoss,
    EarlyStopping,
    build_scheduler,
    class_weights,
    mean_loss,
    predict,
    step_scheduler,
    train_one_epoch,
)
from slidemil.training.predictions import part_metrics, prediction_table, undefined_metrics
from slidemil.training.sampling import training_sampler

if TYPE_CHECKING:
    from slidemil.training.run import TrainData

PARTS = ("train", "val", "test")


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


def train_fold(
    fold: int,
    split: pd.DataFrame,
    data: TrainData,
    config: TrainConfig,
    out: Path,
    context: DistContext,
    budget: EpochBudget,
) -> dict[str, Any] | None:
    """Train, or resume, or skip (finished) one fold; returns its test metrics, or None when the
    epoch budget ran out first."""
    fold_dir = out / f"fold_{fold}"
    done = on_main(context, lambda: _read_metrics(fold_dir))
    if done is not None:
        if context.is_main and not config.quiet:
            tqdm.write(f"fold {fold}: already finished, skipped")
        return done
    if budget.exhausted:
        return None

    parts = {p: split.loc[split["part"] == p, "slide_id"].tolist() for p in PARTS}
    names = list(data.cohort.class_names)
    label_index = {s: names.index(data.cohort[s].label) for s in data.bags}
    if context.is_main:
        _warn_absent_classes(fold, fold_dir, parts, label_index, names)
    standardizer = _fit_standardizer(parts["train"], data) if config.standardize else None

    def dataset(part: str, sample: bool) -> BagDataset:
        ids = parts[part]
        return BagDataset(
            [data.bags[s] for s in ids],
            [label_index[s] for s in ids],
            max_patches=config.max_patches,
            sample=sample,
            cache=data.cache,
            standardizer=standardizer,
            seed=config.seed + 1000 * fold,
        )

    device = context.device
    use_amp = config.amp and device.type == "cuda"
    train_set, val_set = dataset("train", True), dataset("val", False)
    # Each rank takes every world_size-th bag of one order per epoch, all ranks the same number
    # of steps (DDP needs that).
    sampler = training_sampler(
        train_set, train_set.labels, config, fold,
        world_size=context.world_size, rank=context.rank,
    )  # fmt: skip
    train_loader = _loader(train_set, config, data, device, sampler, config.batch_size)
    val_loader = _loader(val_set, config, data, device, _shard(val_set, context))

    entry = get_model_entry(config.model)
    model_kwargs = config.model_kwargs(entry.defaults())
    torch.manual_seed(seed_for(config.seed, fold))  # the same initial weights on every rank
    core = build_model(
        config.model, in_dim=data.feature_dim, n_classes=len(names), **model_kwargs
    ).to(device)
    model = _wrap_ddp(core, context, data.feature_dim) if context.distributed else core
    optimizer = torch.optim.AdamW(core.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    weights = class_weights(train_set.labels, len(names)) if config.class_weights else None
    loss_fn = BagLoss(None if weights is None else weights.to(device))
    stopper = _early_stopping(config)

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
        "split": parts,
        "fold": fold,
        # another process count changes the shards, the effective batch and the dropout seeds
        "world_size": context.world_size,
        "slidemil_version": __version__,
    }
    latest = fold_dir / "checkpoint_latest.pt"
    history: list[dict[str, Any]] = []
    start_epoch = 0
    resumed = on_main(context, lambda: _resume_state(latest, static))
    if resumed is not None:
        state, history = resumed
        core.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        if use_amp and state["scaler_state"]:  # a CPU run resumed on GPU has no scaler state
            scaler.load_state_dict(state["scaler_state"])
        restore_rng_state(state["rng_state"])
        stopper = _early_stopping(
            config,
            best=state["best_metric"],
            best_epoch=state["best_epoch"],
            epochs_without_improvement=state["epochs_without_improvement"],
            best_loss=state.get("best_val_loss", math.nan),
            recent=list(state.get("recent_monitored", [])),
        )
        start_epoch = state["epoch"] + 1

    bar = tqdm(
        total=config.epochs, initial=start_epoch, desc=f"fold {fold}", unit="epoch",
        disable=config.quiet or not context.is_main, dynamic_ncols=True,
    )  # fmt: skip
    finished = True
    for epoch in range(start_epoch, config.epochs):
        if stopper.should_stop:
            break
        if budget.exhausted:
            finished = False
            break
        budget.spend()
        started = time.perf_counter()
        torch.manual_seed(seed_for(config.seed, fold, epoch, context.rank))  # dropout
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        train_loss, n_bags = train_one_epoch(
            model, train_loader, optimizer, loss_fn, scaler, device,
            amp=use_amp, grad_clip=config.grad_clip,
        )  # fmt: skip
        train_loss = mean_over_ranks(train_loss, n_bags, context)
        probabilities, indices = _predict_part(core, val_loader, device, use_amp, context)
        labels = np.asarray(val_set.labels)[indices]
        metrics = part_metrics(labels, probabilities, names, warn_absent=False)
        val_loss = mean_loss(probabilities, labels, weights)
        monitored = val_loss if config.monitor == "loss" else metrics[config.monitor]
        lr = optimizer.param_groups[0]["lr"]
        step_scheduler(scheduler, monitored)
        selected = stopper.smoothed(monitored)  # what picks the best epoch
        improved = stopper.update(monitored, epoch, val_loss)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                **{f"val_{k}": metrics[k] for k in SCALAR_METRICS},
                "val_selected": selected,
                "lr": lr,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        snapshot = None
        if context.is_main:  # only rank 0 saves: the other ranks need not copy the states
            snapshot = {
                **static,
                "model_state": core.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "scaler_state": scaler.state_dict(),
                "rng_state": rng_state(),
                "epoch": epoch,
                "best_metric": stopper.best,
                "best_epoch": stopper.best_epoch,
                "epochs_without_improvement": stopper.epochs_without_improvement,
                "best_val_loss": stopper.best_loss,
                "recent_monitored": list(stopper.recent),
            }
        on_main(context, partial(_save_epoch, fold_dir, history, snapshot, improved))
        bar.set_postfix(
            train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}",
            **{config.monitor: f"{monitored:.3f}"},
        )  # fmt: skip
        bar.update(1)
    bar.close()
    if not finished:
        return None
    return _finish_fold(
        fold, fold_dir, parts, data, label_index, core, standardizer, config, context
    )


def _early_stopping(config: TrainConfig, **state: Any) -> EarlyStopping:
    return EarlyStopping(
        config.monitor != "loss",
        config.patience,
        min_epochs=config.min_epochs,
        smoothing=config.smoothing,
        **state,
    )


def _read_metrics(fold_dir: Path) -> dict[str, Any] | None:
    path = fold_dir / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _warn_absent_classes(fold, fold_dir, parts, label_index, names) -> None:
    """Once per fold (not every epoch): classes missing from the training or validation part."""
    for part, consequence in (
        ("train", "the model cannot learn them"),
        ("val", "their validation recall and AUC are undefined (NaN)"),
    ):
        present = {label_index[s] for s in parts[part]}
        absent = [name for i, name in enumerate(names) if i not in present]
        if absent:
            warnings.warn(
                f"{fold_dir}: fold {fold} has no {part} slide of class(es) {', '.join(absent)}: "
                f"{consequence}",
                AbsentClassWarning,
                stacklevel=3,
            )


def _fit_standardizer(train_ids: list[str], data: TrainData) -> Standardizer:
    if data.cache is not None:
        return fit_standardizer([data.cache[s] for s in train_ids])
    return fit_standardizer([data.bags[s].path for s in train_ids])


def _shard(dataset: BagDataset, context: DistContext) -> DistributedSampler | None:
    """Inference: each rank predicts its share of the bags (None: one process, all of them)."""
    if not context.distributed:
        return None
    return DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=False
    )


def _loader(
    dataset: BagDataset,
    config: TrainConfig,
    data: TrainData,
    device: torch.device,
    sampler: Sampler | None,
    batch_size: int = 1,
) -> DataLoader:
    # Inference runs bag by bag: all instances, no padding. Cached bags are already in RAM, and
    # worker processes would only copy them, so only file reading gets workers. Workers are not
    # persistent: each epoch's workers get the dataset with that epoch's sampling seed.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=pad_bags,
        num_workers=0 if data.cache is not None else config.workers,
        pin_memory=device.type == "cuda",
    )


def _wrap_ddp(core: nn.Module, context: DistContext, in_dim: int) -> DistributedDataParallel:
    """DDP around ``core``; ``find_unused_parameters`` only for a model that needs it (it costs a
    graph traversal every step, and without it such a model stops DDP with an error)."""
    device = context.device
    noise = torch.Generator().manual_seed(0)
    features = torch.randn(1, 16, in_dim, generator=noise).to(device)
    mask = torch.ones(1, 16, dtype=torch.bool, device=device)
    core.train()
    logits = core(features, mask)[0]
    logits.float().sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in core.parameters())
    core.zero_grad(set_to_none=True)
    return DistributedDataParallel(
        core,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=unused,
    )


def _predict_part(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool, context: DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and dataset indices of every bag of a part, the same on every rank."""
    probabilities, indices, _ = predict(model, loader, device, amp=amp)
    return gather_predictions(probabilities, indices, context)


def _resume_state(
    latest: Path, static: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The interrupted run's checkpoint (on the CPU) and its history rows, or None."""
    if not latest.is_file():
        return None
    state = load_checkpoint(latest, "cpu")
    _check_resumable(latest, state, static)
    return state, _read_history(latest.parent / "history.csv", state["epoch"])


def _check_resumable(path: Path, state: dict[str, Any], static: dict[str, Any]) -> None:
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


def _save_epoch(
    fold_dir: Path, history: list[dict[str, Any]], state: dict[str, Any], improved: bool
) -> None:
    atomic.write_csv(fold_dir / "history.csv", pd.DataFrame(history))
    if improved:
        save_checkpoint(fold_dir / "checkpoint_best.pt", state)
    save_checkpoint(fold_dir / "checkpoint_latest.pt", state)


def _finish_fold(
    fold: int,
    fold_dir: Path,
    parts: dict[str, list[str]],
    data: TrainData,
    label_index: dict[str, int],
    core: nn.Module,
    standardizer: Standardizer | None,
    config: TrainConfig,
    context: DistContext,
) -> dict[str, Any]:
    """Predict val and test with the best epoch's weights (each rank a share); rank 0 writes the
    prediction tables and, last, ``metrics.json``, which marks the fold finished."""
    best = on_main(context, lambda: _best_weights(fold_dir / "checkpoint_best.pt"))
    core.load_state_dict(best["model_state"])
    device = context.device
    use_amp = config.amp and device.type == "cuda"
    names = list(data.cohort.class_names)
    tables: dict[str, pd.DataFrame | None] = {}
    for part in ("val", "test"):
        ids = parts[part]
        if not ids:
            tables[part] = None
            continue
        dataset = BagDataset(
            [data.bags[s] for s in ids],
            [label_index[s] for s in ids],
            cache=data.cache,
            standardizer=standardizer,
        )
        loader = _loader(dataset, config, data, device, _shard(dataset, context))
        probabilities, indices = _predict_part(core, loader, device, use_amp, context)
        slide_ids = [ids[i] for i in indices]
        tables[part] = prediction_table(
            slide_ids,
            [data.cohort[s].patient_id for s in slide_ids],
            [label_index[s] for s in slide_ids],
            probabilities,
            names,
            fold,
        )
    return on_main(
        context, lambda: _write_results(fold, fold_dir, parts, tables, best, names, config)
    )


def _best_weights(path: Path) -> dict[str, Any]:
    best = load_checkpoint(path, "cpu")
    return {k: best[k] for k in ("model_state", "epoch", "best_metric")}


def _write_results(fold, fold_dir, parts, tables, best, names, config) -> dict[str, Any]:
    if tables["val"] is not None:
        atomic.write_csv(fold_dir / "val_predictions.csv", tables["val"])
    test = tables["test"]
    if test is not None:
        atomic.write_csv(fold_dir / "predictions.csv", test)
        metrics = part_metrics(
            test["label_index"].to_numpy(),
            test[[f"prob_{n}" for n in names]].to_numpy(),
            names,
            source=f"{fold_dir} test part",
        )
    else:
        metrics = undefined_metrics(names)
    result = {
        **{k: json_number(v) for k, v in metrics.items()},
        "n_train": len(parts["train"]),
        "n_val": len(parts["val"]),
        "n_test": len(parts["test"]),
        "best_epoch": int(best["epoch"]),
        "monitor": config.monitor,
        "best_val": json_number(best["best_metric"]),
    }
    atomic.write_text(fold_dir / "metrics.json", json.dumps(result, indent=2))
    if not config.quiet:
        shown = ", ".join(
            f"{k} {metrics[k]:.3f}" for k in SCALAR_METRICS if not math.isnan(metrics[k])
        )
        tqdm.write(f"fold {fold}: test {shown or 'n/a'} (best epoch {int(best['epoch'])})")
    return result
