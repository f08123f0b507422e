"""A fold's results: predict its val and test parts with the best epoch's weights, write the
prediction tables and, last, ``metrics.json``, whose presence marks the fold finished."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from slidemil import atomic
from slidemil.evaluation.metrics import SCALAR_METRICS, json_number
from slidemil.training.checkpoint import load_checkpoint
from slidemil.training.distributed import DistContext, on_main
from slidemil.training.epochs import predict_part
from slidemil.training.fold_data import FoldData, inference_shard
from slidemil.training.predictions import part_metrics, prediction_table, undefined_metrics


def read_metrics(fold_dir: Path) -> dict[str, Any] | None:
    """A finished fold's ``metrics.json`` dict; None while the fold is unfinished."""
    path = fold_dir / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def finish_fold(
    fold_dir: Path, fold_data: FoldData, core: nn.Module, context: DistContext
) -> dict[str, Any]:
    """Predict val and test with the best epoch's weights (each rank a share); rank 0 writes the
    prediction tables and, last, ``metrics.json``. Returns the metrics dict."""
    best = on_main(context, lambda: _best_weights(fold_dir / "checkpoint_best.pt"))
    core.load_state_dict(best["model_state"])
    config, data = fold_data.config, fold_data.data
    device = context.device
    use_amp = config.amp and device.type == "cuda"
    names = fold_data.class_names
    tables: dict[str, pd.DataFrame | None] = {}
    for part in ("val", "test"):
        ids = fold_data.parts[part]
        if not ids:
            tables[part] = None
            continue
        dataset = fold_data.dataset(part, sample=False)
        loader = fold_data.loader(dataset, device, inference_shard(dataset, context))
        probabilities, indices = predict_part(core, loader, device, use_amp, context)
        slide_ids = [ids[i] for i in indices]
        tables[part] = prediction_table(
            slide_ids,
            [data.cohort[s].patient_id for s in slide_ids],
            [fold_data.label_index[s] for s in slide_ids],
            probabilities,
            names,
            fold_data.fold,
            [data.cohort[s].site for s in slide_ids] if data.cohort.has_sites else None,
        )
    return on_main(context, lambda: _write_results(fold_dir, fold_data, tables, best))


def _best_weights(path: Path) -> dict[str, Any]:
    best = load_checkpoint(path, "cpu")
    return {k: best[k] for k in ("model_state", "epoch", "best_metric")}


def _write_results(
    fold_dir: Path,
    fold_data: FoldData,
    tables: dict[str, pd.DataFrame | None],
    best: dict[str, Any],
) -> dict[str, Any]:
    config, parts, names = fold_data.config, fold_data.parts, fold_data.class_names
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
        tqdm.write(
            f"fold {fold_data.fold}: test {shown or 'n/a'} (best epoch {int(best['epoch'])})"
        )
    return result
