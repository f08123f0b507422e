"""What travels with an exported graph: ``model.json`` (machine-readable) and ``MODEL_CARD.md``.

``model.json`` keeps the keys of the run's ``run.json`` that prediction needs (class names,
encoder, feature size, patch and extract options with the feature identity), so an export
predicts raw slides exactly like its run, plus what a deployer must know: the graph's inputs and
outputs, the folds it holds, the training cohort and the test metrics mean ± std over folds.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil import __version__
from slidemil.evaluation.metrics import SCALAR_METRICS
from slidemil.prediction.trained_run import TrainedRun

MODEL_JSON = "model.json"
MODEL_CARD = "MODEL_CARD.md"
EXPORT_FORMAT_VERSION = 1


def training_cohort(run: TrainedRun) -> dict[str, Any]:
    """Slides, patients and slides per class of the run's cohort (from its ``splits.csv``)."""
    path = run.path / "splits.csv"
    if not path.is_file():
        return {}
    splits = pd.read_csv(path, dtype=str, keep_default_na=False)
    slides = splits.drop_duplicates("slide_id")
    return {
        "slides": len(slides),
        "patients": int(slides["patient_id"].nunique()),
        "slides_per_class": {
            k: int(v) for k, v in slides["label"].value_counts().sort_index().items()
        },
        "excluded_slides": len(run.info.get("excluded_slides") or {}),
    }


def fold_metrics(run: TrainedRun, folds: list[str]) -> dict[str, dict[str, float | None]]:
    """Test metrics of the exported folds: mean, std (ddof 0) and n per scalar metric."""
    rows = []
    for name in folds:
        path = run.path / name / "metrics.json"
        if path.is_file():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    summary = {}
    for key in SCALAR_METRICS:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        values = [v for v in values if not math.isnan(v)]
        summary[key] = {
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values)) if values else None,
            "n_folds": len(values),
        }
    return summary


COORDS_INPUT = (
    "(N, 2) float32 level-0 x, y of each patch, the rows of features (the feature file's "
    "/coords): the model lays the patches out on their grid"
)


def model_record(
    run: TrainedRun,
    folds: list[str],
    graph_file: str,
    graph_format: str,
    sha256: str,
    uses_coords: bool = False,
) -> dict[str, Any]:
    """The ``model.json`` dict of an export of ``folds`` of ``run`` (``uses_coords``: the graph
    takes the patches' coordinates as a second input)."""
    inputs = {"features": "(N, D) float32 raw features of one slide, any N >= 1"}
    if uses_coords:
        inputs["coords"] = COORDS_INPUT
    info = run.info
    patch = run.patch_options() or {}
    record = run.extract_record() or {}
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "slidemil_version": __version__,
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "graph": {
            "file": graph_file,
            "format": graph_format,
            "sha256": sha256,
            "input": inputs,
            "outputs": {
                "probabilities": "(C,) class probabilities, mean over folds, class_names order",
                "attention": "(N, F) softmax attention per fold (each column sums to 1)",
                "fold_probabilities": "(F, C) each fold's class probabilities",
                "scores": "(N, F) raw pre-softmax attention scores per fold",
            },
        },
        "class_names": list(run.class_names),
        "folds": folds,
        "model": info.get("model"),
        "model_kwargs": info.get("model_kwargs"),
        "feature_dim": run.feature_dim,
        "encoder": run.encoder,
        "feature_identity": run.identity(),
        "patch_size": patch.get("patch_size"),
        "target_mpp": patch.get("target_mpp"),
        "magnification": patch.get("magnification"),
        "training_cohort": training_cohort(run),
        "test_metrics": fold_metrics(run, folds),
        "source_run": str(run.path),
        # prediction from raw slides redoes these exactly (see prediction.sources)
        "patch_config": run.patch_options(),
        "extract_config": record or None,
    }


def model_card(record: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: intended use, data, metrics and limits, from the ``model.json`` dict."""
    identity = record.get("feature_identity") or {}
    cohort = record.get("training_cohort") or {}
    per_class = ", ".join(f"{k}: {v}" for k, v in (cohort.get("slides_per_class") or {}).items())
    lines = [
        f"# Model card: {record.get('model')} on {record['encoder']} features",
        "",
        "## Intended use",
        f"Classifies a whole-slide image into one of {', '.join(record['class_names'])} from the "
        "features of its tissue patches, with per-patch attention for review. A research model: "
        "it supports, and never replaces, a pathologist's diagnosis, and it is not a medical "
        "device.",
        "",
        "## Inputs",
        f"- Patches of {record.get('patch_size')} px at "
        + (
            f"{record['target_mpp']} µm/px"
            if record.get("target_mpp") is not None
            else f"{record.get('magnification')}× magnification"
        ),
        f"- Features from encoder `{identity.get('encoder', record['encoder'])}`, weights "
        f"`{identity.get('weights_identity', 'unrecorded')}`, transform "
        f"`{json.dumps(identity.get('transform'))}`; D = {record['feature_dim']}",
        f"- Graph `{record['graph']['file']}` ({record['graph']['format']}): input `features` "
        "(N, D) float32, raw (the graph standardises them itself)"
        + (
            f"; input `coords`: {COORDS_INPUT}"
            if "coords" in record["graph"].get("input", {})
            else ""
        ),
        "",
        "## Training data",
        f"- {cohort.get('slides', '?')} slides of {cohort.get('patients', '?')} patients "
        f"({per_class or 'per-class counts unrecorded'}); "
        f"{cohort.get('excluded_slides', 0)} slide(s) excluded for missing features",
        f"- Folds in this export: {', '.join(record['folds'])} (probabilities are their mean)",
        "- Probabilities: "
        + (
            "temperature-calibrated per fold (on its validation part)"
            if record.get("calibration") == "temperature"
            else "uncalibrated softmax (see `slidemil evaluate --calibrate temperature`)"
        ),
        "",
        "## Metrics (test part of each fold, mean ± std over folds)",
        "| metric | mean | std | folds |",
        "|---|---|---|---|",
    ]
    for key, value in (record.get("test_metrics") or {}).items():
        shown = [_number(value.get("mean")), _number(value.get("std"))]
        lines.append(f"| {key} | {shown[0]} | {shown[1]} | {value.get('n_folds', 0)} |")
    lines += [
        "",
        "## Limits",
        "- Valid only for slides prepared, scanned and stained like the training cohort; other "
        "scanners, stains, sites or tissue types need their own validation.",
        "- Features must come from the same encoder, weights and transform at the same patch "
        "size and resolution; other features give meaningless outputs without an error.",
        "- Attention shows what the model weighted, not where a lesion is; it is no segmentation.",
        "- Metrics come from a cohort of the size above and carry its uncertainty.",
        "",
        f"Exported by slidemil {record['slidemil_version']} on {record['exported']} from "
        f"`{record['source_run']}`.",
        "",
    ]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def read_model_record(folder: Path) -> dict[str, Any]:
    """``model.json`` of an export folder as a dict (checked by the caller)."""
    return json.loads((folder / MODEL_JSON).read_text(encoding="utf-8"))
