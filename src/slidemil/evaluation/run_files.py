"""Reading what evaluation evaluates: a run's ``run.json``, its folds' test and validation
prediction tables, and an external cohort's ``predictions.csv`` written by ``slidemil predict``;
and aggregating slide rows into patient rows.

Every table is returned in one shape: ``slide_id, patient_id, label, label_index, fold,
prob_<class>...`` (run class order; ``site`` after ``patient_id`` when the file has one), checked
against the run's class names.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil.errors import ArtifactError
from slidemil.formats.prediction_table import probability_columns

logger = logging.getLogger(__name__)

TEST_FILE = "predictions.csv"
VALIDATION_FILE = "val_predictions.csv"
EXTERNAL_FOLD = "external"  # the ``fold`` value of external rows


@dataclass(frozen=True)
class RunInfo:
    """What ``run.json`` says about a run, and which fold folders are expected."""

    run_dir: Path
    class_names: tuple[str, ...]
    expected_folds: tuple[int, ...]
    meta: dict[str, Any]

    def fold_dir(self, fold: int) -> Path:
        return self.run_dir / f"fold_{fold}"


def read_run(run_dir: str | Path) -> RunInfo:
    """Read ``run.json``; raise :class:`ArtifactError` naming the folder if it is not a run."""
    run_dir = Path(run_dir)
    fix = "pass the folder written by `slidemil train --out`"
    if not run_dir.is_dir():
        raise ArtifactError(run_dir, "not a folder", fix)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ArtifactError(run_dir, "not a slidemil run (no run.json)", fix)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(meta_path, f"not valid JSON: {e}") from e
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) != len(names):
        raise ArtifactError(meta_path, "'class_names' must list at least 2 distinct names")
    folds = meta.get("folds")
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        raise ArtifactError(meta_path, f"'folds' must be a positive integer, got {folds!r}")
    return RunInfo(run_dir, tuple(map(str, names)), _expected_folds(run_dir, folds), meta)


def _expected_folds(run_dir: Path, folds: int) -> tuple[int, ...]:
    """Fold folders are numbered from 0 (``fold_0`` ... ``fold_<K-1>``); accept 1-based
    numbering when the folders on disk show it (``fold_<K>`` present, ``fold_0`` absent)."""
    one_based = (run_dir / f"fold_{folds}").is_dir() and not (run_dir / "fold_0").is_dir()
    start = 1 if one_based else 0
    return tuple(range(start, start + folds))


def read_test_predictions(run: RunInfo) -> tuple[pd.DataFrame, tuple[int, ...]]:
    """Every finished fold's ``predictions.csv`` together, and the folds that have none yet."""
    frames, missing = [], []
    for fold in run.expected_folds:
        path = run.fold_dir(fold) / TEST_FILE
        if path.is_file():
            frames.append(read_fold_predictions(path, run.class_names, fold))
        else:
            missing.append(fold)
    if not frames:
        raise ArtifactError(
            run.run_dir,
            f"no fold has {TEST_FILE} yet (expected fold_{run.expected_folds[0]}/{TEST_FILE} ...)",
            "wait for training to finish a fold",
        )
    return pd.concat(frames, ignore_index=True), tuple(missing)


def read_validation_predictions(run: RunInfo, folds: tuple[int, ...], why: str) -> pd.DataFrame:
    """The ``val_predictions.csv`` of ``folds`` together; ``why`` names the option needing them."""
    frames = []
    for fold in folds:
        path = run.fold_dir(fold) / VALIDATION_FILE
        if not path.is_file():
            raise ArtifactError(
                path, f"missing: {why} is chosen on validation predictions", "retrain the fold"
            )
        frames.append(read_fold_predictions(path, run.class_names, fold))
    return pd.concat(frames, ignore_index=True)


def read_fold_predictions(path: Path, class_names: tuple[str, ...], fold: int) -> pd.DataFrame:
    """One fold's ``predictions.csv`` (or ``val_predictions.csv``) as ``slide_id, patient_id,
    label, label_index, fold, prob_<class>...``, checked against the run's class names."""
    return _checked_table(_read_csv(path), path, class_names, fold)


def read_external_predictions(path: str | Path, class_names: tuple[str, ...]) -> pd.DataFrame:
    """A labelled ``predictions.csv`` of ``slidemil predict`` (or the folder holding it), in the
    common shape with ``fold = "external"`` and a ``calibration`` column (``none`` when the file
    predates calibration). Slides without a label are left out, with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / TEST_FILE
    if not path.is_file():
        raise ArtifactError(path, "not found", "pass the --out folder of `slidemil predict`")
    frame = _read_csv(path)
    if "label" not in frame.columns:
        raise ArtifactError(
            path,
            "has no label column: the external cohort carries no true labels",
            "predict a cohort CSV with a label column",
        )
    unlabelled = frame["label"].isna() | (frame["label"].astype(str).str.strip() == "")
    if unlabelled.all():
        raise ArtifactError(path, "no slide has a label", "predict a labelled cohort CSV")
    if unlabelled.any():
        logger.warning("%s: %d slide(s) without a label left out", path, int(unlabelled.sum()))
        frame = frame[~unlabelled].reset_index(drop=True)
    table = _checked_table(frame, path, class_names, EXTERNAL_FOLD)
    calibration = frame["calibration"] if "calibration" in frame.columns else "none"
    table["calibration"] = pd.Series(calibration, index=table.index).fillna("none").astype(str)
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArtifactError(path, f"not a readable CSV: {e}") from e


def _checked_table(
    frame: pd.DataFrame, path: Path, class_names: tuple[str, ...], fold: int | str
) -> pd.DataFrame:
    prob_columns = probability_columns(class_names)
    needed = ["slide_id", *prob_columns]
    lacking = [c for c in needed if c not in frame.columns]
    if "label" not in frame.columns and "label_index" not in frame.columns:
        lacking.append("label")
    if lacking:
        raise ArtifactError(path, f"missing column(s) {', '.join(lacking)}")
    if frame.empty:
        raise ArtifactError(path, "has no predictions", "rerun this fold's training")
    if "label" in frame.columns:
        index_of = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(frame["label"]) - set(index_of), key=str)
        if unknown:
            raise ArtifactError(
                path, f"label(s) {', '.join(map(str, unknown[:5]))} not in run.json class_names"
            )
        label_index = frame["label"].map(index_of).astype(np.int64)
        if "label_index" in frame.columns and (label_index != frame["label_index"]).any():
            raise ArtifactError(path, "label and label_index disagree with run.json class_names")
    else:
        label_index = pd.to_numeric(frame["label_index"], errors="coerce")
        if label_index.isna().any() or not label_index.between(0, len(class_names) - 1).all():
            raise ArtifactError(path, f"label_index must be in 0..{len(class_names) - 1}")
        label_index = label_index.astype(np.int64)
    probs = frame[prob_columns].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(probs.to_numpy()).all():
        raise ArtifactError(path, "probability columns hold empty or non-numeric values")
    patient = frame["patient_id"] if "patient_id" in frame.columns else frame["slide_id"]
    patient = patient.fillna(frame["slide_id"])
    site = {"site": frame["site"].fillna("").astype(str)} if "site" in frame.columns else {}
    return pd.DataFrame(
        {
            "slide_id": frame["slide_id"].astype(str),
            "patient_id": patient.astype(str),
            **site,
            "label": [class_names[i] for i in label_index],
            "label_index": label_index.to_numpy(),
            "fold": fold,
            **{c: probs[c].to_numpy(dtype=np.float64) for c in prob_columns},
        }
    )


def mixed_label_patients(predictions: pd.DataFrame) -> list[str]:
    """Patients whose slides carry different labels (they have no patient-level truth)."""
    labels = predictions.groupby(["fold", "patient_id"], sort=True)["label_index"].nunique()
    return [str(patient) for _, patient in labels[labels > 1].index]


def aggregate_patients(
    predictions: pd.DataFrame, class_names: tuple[str, ...], source: Path, how: str = "mean"
) -> pd.DataFrame:
    """One row per patient and fold, from its slides' probabilities.

    ``how="mean"``: the mean of the slides' probabilities. ``how="max"`` (2 classes only, "any
    slide positive"): the positive class's maximum, the negative class 1 minus it. ``slide_id``
    becomes the patient's slide ids joined by ``;`` and ``n_slides`` counts them. A patient whose
    slides carry different labels cannot be evaluated per patient (:class:`ArtifactError` naming
    ``source``).
    """
    if how not in ("mean", "max"):
        raise ValueError(f"unknown patient aggregation {how!r}")
    if how == "max" and len(class_names) != 2:
        raise ArtifactError(
            source,
            f"patient aggregation 'max' needs 2 classes (a positive one), the run has "
            f"{len(class_names)}",
            "use --patient-aggregation mean",
        )
    prob_columns = probability_columns(class_names)
    mixed = mixed_label_patients(predictions)
    if mixed:
        raise ArtifactError(
            source,
            f"patient(s) {', '.join(mixed[:5])} have slides with different labels",
            "evaluate with --level slide",
        )
    groups = predictions.groupby(["fold", "patient_id"], sort=True)
    reducer = "mean" if how == "mean" else "max"
    patients = groups.agg(
        slide_id=("slide_id", ";".join),
        n_slides=("slide_id", "size"),
        label_index=("label_index", "first"),
        **{c: (c, reducer) for c in prob_columns},
    ).reset_index()
    if how == "max":
        patients[prob_columns[0]] = 1.0 - patients[prob_columns[1]]
    patients["label"] = [class_names[i] for i in patients["label_index"]]
    columns = ["slide_id", "patient_id", "n_slides", "label", "label_index", "fold", *prob_columns]
    # a patient's slides share these (one site per patient under site holdout)
    extra = [c for c in predictions.columns if c not in columns and c in ("calibration", "site")]
    for column in extra:
        patients[column] = groups[column].first().to_numpy()
    return patients[columns + extra]
