"""``train()``: features + cohort -> one trained model per fold, with splits, checkpoints,
history, predictions and metrics under the run folder.

Layout::

    <out>/config.yaml   resolved options        <out>/run.json   classes, encoder, model, D, ...
    <out>/splits.csv    slide_id, patient_id, label, fold, part
    <out>/fold_<k>/     checkpoint_best.pt, checkpoint_latest.pt, history.csv, metrics.json,
                        predictions.csv (test part), val_predictions.csv

A fold whose ``metrics.json`` exists is finished and skipped; an unfinished fold resumes from its
``checkpoint_latest.pt`` and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from slidemil import __version__, atomic
from slidemil.cohort import Cohort, load_cohort
from slidemil.config import build, write_resolved
from slidemil.errors import ArtifactError, ConfigError
from slidemil.models import build_model, get_model_entry
from slidemil.training.bags import (
    BagDataset,
    BagInfo,
    Standardizer,
    fit_standardizer,
    load_cache,
    pad_bags,
    probe_feature_file,
)
from slidemil.training.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from slidemil.training.config import RUNTIME_OPTIONS, TrainConfig
from slidemil.training.distributed import (
    DistContext,
    barrier,
    mean_over_ranks,
    setup_distributed,
    teardown_distributed,
)
from slidemil.training.loop import (
    EarlyStopping,
    build_scheduler,
    class_weights,
    mean_loss,
    predict,
    step_scheduler,
    train_one_epoch,
)
from slidemil.training.predictions import classification_metrics, prediction_table
from slidemil.training.splits import make_splits

log = logging.getLogger(__name__)

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


class MissingBagsWarning(UserWarning):
    """Some cohort slides have no usable feature file; training goes on without them."""


@dataclass
class TrainData:
    """What every fold shares: the cohort, the usable bags and the slides left out (and why)."""

    cohort: Cohort
    encoder: str
    bags: dict[str, BagInfo]
    excluded: dict[str, str]
    feature_dim: int
    cache: dict[str, np.ndarray] | None = None


@dataclass
class TrainResult:
    """The run folder and, per fold trained here, its test metrics (None: stopped early by
    ``epoch_budget``, resume later)."""

    out: Path
    folds: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)


def train(
    work: str | Path,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    config_file: str | Path | None = None,
    **options: Any,
) -> TrainResult:
    """Train MIL models on ``work/features/<encoder>/`` bags labelled by ``work/cohort.csv``.

    Options are :class:`TrainConfig` fields (``train("work", "runs/exp1", folds=5)``); a YAML
    ``config_file``'s ``train`` section supplies defaults. Under torchrun every rank calls this;
    only rank 0 writes.
    """
    config = config or build(
        TrainConfig, section="train", config_file=config_file, overrides=options
    )
    get_model_entry(config.model)  # fail before any work on an unknown model
    work, out = Path(work), Path(out)
    context = setup_distributed(config.device)
    try:
        data = load_train_data(work, config)
        splits = _splits_for(data, config)
        n_folds = int(splits["fold"].max()) + 1
        if config.fold is not None and config.fold >= n_folds:
            raise ConfigError(None, f"fold {config.fold} does not exist: the run has {n_folds}")
        if context.is_main:
            _write_run_files(out, work, config, data, splits, n_folds)
        barrier(context)
        result = TrainResult(out, excluded=dict(data.excluded))
        for fold in [config.fold] if config.fold is not None else range(n_folds):
            result.folds[fold] = train_fold(
                fold, splits[splits["fold"] == fold], data, config, out, context
            )
        return result
    finally:
        teardown_distributed(context)


def resolve_encoder(work: Path, encoder: str | None) -> str:
    """The feature folder to use: the one named, or the only one under ``work/features``."""
    root = work / "features"
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found:
        raise ArtifactError(root, "no feature folders", "run 'slidemil extract' first")
    if encoder is None:
        if len(found) > 1:
            raise ConfigError(
                root, f"several feature folders: {', '.join(found)}", "choose one with --encoder"
            )
        return found[0]
    if encoder not in found:
        raise ConfigError(root, f"no feature folder {encoder!r}; found {', '.join(found)}")
    return encoder


def load_train_data(work: Path, config: TrainConfig) -> TrainData:
    """Read the cohort, probe every slide's feature file and set unusable ones aside."""
    cohort = load_cohort(work / "cohort.csv", require_labels=True, check_files=False)
    encoder = resolve_encoder(work, config.encoder)
    folder = work / "features" / encoder
    bags: dict[str, BagInfo] = {}
    excluded: dict[str, str] = {}
    for record in cohort:
        probed = probe_feature_file(record.slide_id, folder / f"{record.slide_id}.h5")
        if isinstance(probed, str):
            excluded[record.slide_id] = probed
        else:
            bags[record.slide_id] = probed
    if excluded:
        listed = ", ".join(f"{s} ({why})" for s, why in list(excluded.items())[:20])
        more = f" and {len(excluded) - 20} more" if len(excluded) > 20 else ""
        warnings.warn(
            f"{folder}: training without {len(excluded)} slide(s) lacking usable features: "
            f"{listed}{more}",
            MissingBagsWarning,
            stacklevel=3,
        )
    if not bags:
        raise ArtifactError(folder, "no usable feature files for the cohort's slides")
    dims = {info.dim for info in bags.values()}
    if len(dims) > 1:
        raise ArtifactError(folder, f"feature files disagree on the feature size D: {sorted(dims)}")
    data = TrainData(cohort, encoder, bags, excluded, dims.pop())
    total_bytes = sum(info.nbytes for info in bags.values())
    use_cache = config.cache
    if use_cache is None:
        use_cache = total_bytes <= config.cache_limit_gb * 2**30
    if use_cache:
        data.cache = load_cache(list(bags.values()))
    return data


def _splits_for(data: TrainData, config: TrainConfig) -> pd.DataFrame:
    records = [r for r in data.cohort if r.slide_id in data.bags]
    frame = pd.DataFrame(
        {
            "slide_id": [r.slide_id for r in records],
            "patient_id": [r.patient_id for r in records],
            "label": [r.label for r in records],
            "split": [r.split for r in records],
        }
    )
    if frame["split"].notna().any() and config.folds > 1:
        warnings.warn(
            f"{data.cohort.source}: the cohort's split column is used; --folds is ignored",
            UserWarning,
            stacklevel=3,
        )
    return make_splits(
        frame,
        folds=config.folds,
        fractions=config.split_fractions,
        val_fraction=config.val_fraction,
        seed=config.seed,
        source=None if data.cohort.source is None else str(data.cohort.source),
    )


def _write_run_files(out, work, config, data, splits, n_folds) -> None:
    write_resolved(out / "config.yaml", {"train": config})
    entry = get_model_entry(config.model)
    run = {
        "class_names": list(data.cohort.class_names),
        "folds": n_folds,
        "encoder": data.encoder,
        "model": config.model,
        "model_kwargs": config.model_kwargs(entry.defaults()),
        "feature_dim": data.feature_dim,
        "work": str(work.resolve()),
        "slidemil_version": __version__,
        "excluded_slides": data.excluded,
    }
    atomic.write_text(out / "run.json", json.dumps(run, indent=2))
    atomic.write_csv(out / "splits.csv", splits)


def train_fold(
    fold: int,
    split: pd.DataFrame,
    data: TrainData,
    config: TrainConfig,
    out: Path,
    context: DistContext,
) -> dict[str, Any] | None:
    """Train, or resume, or skip (finished) one fold; returns its test metrics."""
    fold_dir = out / f"fold_{fold}"
    if (fold_dir / "metrics.json").is_file():
        if context.is_main and not config.quiet:
            tqdm.write(f"fold {fold}: already finished, skipped")
        return json.loads((fold_dir / "metrics.json").read_text(encoding="utf-8"))

    parts = {
        p: split.loc[split["part"] == p, "slide_id"].tolist() for p in ("train", "val", "test")
    }
    names = data.cohort.class_names
    label_index = {r.slide_id: names.index(r.label) for r in data.cohort if r.slide_id in data.bags}
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

    train_set, val_set = dataset("train", True), dataset("val", False)
    sampler = DistributedSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
        seed=config.seed + fold,
    )  # fmt: skip
    train_loader = _loader(train_set, config, sampler=sampler, batch_size=config.batch_size)
    val_loader = _loader(val_set, config)

    device = context.device
    use_amp = config.amp and device.type == "cuda"
    entry = get_model_entry(config.model)
    model_kwargs = config.model_kwargs(entry.defaults())
    torch.manual_seed(config.seed + fold)  # same initial weights on every rank and every run
    core = build_model(
        config.model, in_dim=data.feature_dim, n_classes=len(names), **model_kwargs
    ).to(device)
    model: nn.Module = core
    if context.distributed:
        model = DistributedDataParallel(
            core, device_ids=[device] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(core.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    weights = class_weights(train_set.labels, len(names)) if config.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    stopper = EarlyStopping(config.monitor != "loss", config.patience)
    history: list[dict[str, Any]] = []
    start_epoch = 0

    static = {
        "model_name": config.model,
        "model_kwargs": model_kwargs,
        "monitor": config.monitor,
        "config": config.model_dump(mode="json"),
        "class_names": list(names),
        "encoder": data.encoder,
        "feature_dim": data.feature_dim,
        "standardization": None if standardizer is None else standardizer.to_state(),
        "split": parts,
        "fold": fold,
        "slidemil_version": __version__,
    }
    latest = fold_dir / "checkpoint_latest.pt"
    if latest.is_file():
        state = load_checkpoint(latest, device)
        _check_resumable(latest, state, static)
        core.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        scaler.load_state_dict(state["scaler_state"])
        restore_rng_state(state["rng_state"])
        stopper = EarlyStopping(
            config.monitor != "loss",
            config.patience,
            state["best_metric"],
            state["best_epoch"],
            state["epochs_without_improvement"],
        )
        start_epoch = state["epoch"] + 1
        history = _read_history(fold_dir / "history.csv", state["epoch"])

    bar = tqdm(
        total=config.epochs, initial=start_epoch, desc=f"fold {fold}", unit="epoch",
        disable=config.quiet or not context.is_main, dynamic_ncols=True,
    )  # fmt: skip
    finished = True
    for epochs_run, epoch in enumerate(range(start_epoch, config.epochs)):
        if stopper.should_stop:
            break
        if config.epoch_budget is not None and epochs_run >= config.epoch_budget:
            finished = False
            break
        started = time.perf_counter()
        # Dropout and sampling depend only on (seed, fold, epoch): a resumed run repeats them.
        torch.manual_seed(config.seed * 100_003 + fold * 1009 + epoch)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        train_loss, n_bags = train_one_epoch(
            model, train_loader, optimizer, loss_fn, scaler, device,
            amp=use_amp, grad_clip=config.grad_clip,
        )  # fmt: skip
        train_loss = mean_over_ranks(train_loss, n_bags, context)
        metrics, val_loss = _evaluate(core, val_loader, val_set, names, weights, device, use_amp)
        monitored = val_loss if config.monitor == "loss" else metrics[config.monitor]
        lr = optimizer.param_groups[0]["lr"]
        step_scheduler(scheduler, monitored)
        improved = stopper.update(monitored, epoch)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                **{f"val_{k}": metrics[k] for k in METRIC_NAMES},
                "lr": lr,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        if context.is_main:
            state = {
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
            }
            if improved:
                save_checkpoint(fold_dir / "checkpoint_best.pt", state)
            save_checkpoint(latest, state)
            atomic.write_csv(fold_dir / "history.csv", pd.DataFrame(history))
        bar.set_postfix(
            train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}",
            **{config.monitor: f"{monitored:.3f}"},
        )  # fmt: skip
        bar.update(1)
    bar.close()
    barrier(context)
    if not finished:
        return None
    result = None
    if context.is_main:
        result = _finish_fold(
            fold, fold_dir, parts, data, label_index, standardizer, config, device
        )
    barrier(context)
    return result


def _loader(dataset: BagDataset, config: TrainConfig, *, sampler=None, batch_size: int = 1):
    # validation and test run bag by bag: all instances, no padding memory
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=pad_bags,
        num_workers=config.workers,
        pin_memory=torch.cuda.is_available(),
    )


def _fit_standardizer(train_ids: list[str], data: TrainData) -> Standardizer:
    if data.cache is not None:
        return fit_standardizer([data.cache[s] for s in train_ids])
    return fit_standardizer([data.bags[s].path for s in train_ids])


def _evaluate(model, loader, dataset, names, weights, device, amp):
    probabilities, indices, _ = predict(model, loader, device, amp=amp)
    labels = np.asarray(dataset.labels)[indices]
    metrics = classification_metrics(labels, probabilities, len(names))
    return metrics, mean_loss(probabilities, labels, weights)


def _check_resumable(path: Path, state: dict[str, Any], static: dict[str, Any]) -> None:
    saved = {k: v for k, v in state["config"].items() if k not in RUNTIME_OPTIONS}
    now = {k: v for k, v in static["config"].items() if k not in RUNTIME_OPTIONS}
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        raise ConfigError(
            path,
            f"cannot resume: option(s) {', '.join(changed)} differ from the interrupted run",
            "use the same options, or a new --out folder",
        )
    if state["split"] != static["split"]:
        raise ConfigError(
            path,
            "cannot resume: the split differs from the interrupted run (cohort or features "
            "changed)",
            "use a new --out folder",
        )


def _read_history(path: Path, last_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    frame = pd.read_csv(path)
    return frame[frame["epoch"] <= last_epoch].to_dict("records")


def _finish_fold(fold, fold_dir, parts, data, label_index, standardizer, config, device) -> dict:
    """Predict val and test with the best checkpoint; write predictions and metrics.json last."""
    best = load_checkpoint(fold_dir / "checkpoint_best.pt")
    names = data.cohort.class_names
    model = build_model(
        best["model_name"],
        in_dim=data.feature_dim,
        n_classes=len(names),
        **best["model_kwargs"],
    )
    model.load_state_dict(best["model_state"])
    model.to(device)
    use_amp = config.amp and device.type == "cuda"
    tables = {}
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
        probabilities, indices, _ = predict(model, _loader(dataset, config), device, amp=use_amp)
        slide_ids = [ids[i] for i in indices]
        tables[part] = prediction_table(
            slide_ids,
            [data.cohort[s].patient_id for s in slide_ids],
            [label_index[s] for s in slide_ids],
            probabilities,
            names,
            fold,
        )
    atomic.write_csv(fold_dir / "val_predictions.csv", tables["val"])
    if tables["test"] is not None:
        atomic.write_csv(fold_dir / "predictions.csv", tables["test"])
        test = tables["test"]
        probabilities = test[[f"prob_{n}" for n in names]].to_numpy()
        metrics = classification_metrics(test["label_index"].to_numpy(), probabilities, len(names))
    else:
        metrics = dict.fromkeys(METRIC_NAMES, math.nan)
    result = {
        **{k: (None if math.isnan(v) else v) for k, v in metrics.items()},
        "n_test": len(parts["test"]),
        "best_epoch": int(best["epoch"]),
        "monitor": config.monitor,
        "best_val": None if math.isnan(best["best_metric"]) else best["best_metric"],
    }
    atomic.write_text(fold_dir / "metrics.json", json.dumps(result, indent=2))
    if not config.quiet:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not math.isnan(v))
        tqdm.write(f"fold {fold}: test {shown} (best epoch {int(best['epoch'])})")
    return result
