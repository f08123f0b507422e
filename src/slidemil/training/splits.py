"""Patient-level, stratified splits (pure functions: a table in, a table out).

The result has one row per slide and fold: ``slide_id, patient_id, label, fold, part`` with part
in ``train``/``val``/``test``. A patient's slides always share a part within a fold. Patients are
stratified by their most frequent label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from slidemil.errors import CohortError

PARTS = ("train", "val", "test")
SPLIT_COLUMNS = ["slide_id", "patient_id", "label", "fold", "part"]


def make_splits(
    slides: pd.DataFrame,
    *,
    folds: int = 1,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    val_fraction: float = 0.2,
    seed: int = 0,
    source: str | None = None,
) -> pd.DataFrame:
    """Assign every slide a part per fold.

    Args:
        slides: columns ``slide_id, patient_id, label`` and optionally ``split``; a ``split``
            column with a value on every row is used as is (one fold).
        folds: 1 for one split by ``fractions``; K > 1 for K-fold CV over patients, with
            ``val_fraction`` of each fold's training patients held out for validation.
        seed: the same seed and slides give the same splits (on every rank).
        source: the cohort file, named in errors.
    """
    slides = slides.reset_index(drop=True)
    if "split" in slides.columns and slides["split"].notna().any():
        return _given_split(slides, source)
    if folds == 1:
        parts = _patient_parts(slides, fractions, seed, source)
        return _table(slides, 0, slides["patient_id"].map(parts))
    tables = []
    for fold, (rest_idx, test_idx) in enumerate(_kfold(slides, folds, seed, source)):
        rest = slides.iloc[rest_idx]
        rest_parts = _patient_parts(
            rest, (1 - val_fraction, val_fraction, 0.0), seed + fold, source
        )
        part = slides["patient_id"].map(rest_parts).fillna("test")
        part.iloc[test_idx] = "test"
        tables.append(_table(slides, fold, part))
    return pd.concat(tables, ignore_index=True)


def patient_labels(slides: pd.DataFrame) -> pd.Series:
    """Each patient's most frequent label (ties: the first in sorted order)."""
    counts = slides.groupby(["patient_id", "label"]).size().reset_index(name="n")
    counts = counts.sort_values(["patient_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("patient_id").set_index("patient_id")["label"]


def _table(slides: pd.DataFrame, fold: int, part: pd.Series) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "slide_id": slides["slide_id"].to_numpy(),
            "patient_id": slides["patient_id"].to_numpy(),
            "label": slides["label"].to_numpy(),
            "fold": fold,
            "part": part.to_numpy(),
        },
        columns=SPLIT_COLUMNS,
    )


def _given_split(slides: pd.DataFrame, source: str | None) -> pd.DataFrame:
    missing = slides.loc[slides["split"].isna(), "slide_id"].tolist()
    if missing:
        raise CohortError(
            source,
            f"the split column is empty for {len(missing)} slide(s), e.g. {missing[:5]}",
            "fill it for every slide or remove the column for automatic splits",
        )
    per_patient = slides.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1].index.tolist()
    if leaking:
        raise CohortError(
            source,
            f"patient(s) {leaking[:5]} have slides in more than one split",
            "put all slides of a patient in the same split",
        )
    for needed in ("train", "val"):
        if not (slides["split"] == needed).any():
            raise CohortError(source, f"the split column has no {needed!r} slides")
    return _table(slides, 0, slides["split"])


def _check_class_sizes(labels: pd.Series, needed: int, what: str, source: str | None) -> None:
    counts = labels.value_counts()
    small = counts[counts < needed]
    if len(small):
        listed = ", ".join(f"{name!r} ({n})" for name, n in small.items())
        raise CohortError(
            source,
            f"class(es) {listed} have fewer than {needed} patients, too few for {what}",
            "add patients, merge classes, use fewer folds, or give a split column",
        )


def _patient_parts(
    slides: pd.DataFrame,
    fractions: tuple[float, float, float],
    seed: int,
    source: str | None,
) -> dict[str, str]:
    """Patient -> part, drawing each class's patients by the fractions (each used part >= 1)."""
    labels = patient_labels(slides)
    used = [p for p, f in zip(PARTS, fractions, strict=True) if f > 0]
    _check_class_sizes(labels, len(used), f"a {'/'.join(used)} split", source)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(labels.unique()):
        patients = np.array(sorted(labels.index[labels == label]))
        rng.shuffle(patients)
        n = len(patients)
        n_val = max(1, round(n * fractions[1]))
        n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
        while n - n_val - n_test < 1:  # keep at least one training patient
            if n_test > 1 and n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        counts = {"val": n_val, "test": n_test, "train": n - n_val - n_test}
        start = 0
        for part in ("val", "test", "train"):
            for patient in patients[start : start + counts[part]]:
                assignment[str(patient)] = part
            start += counts[part]
    return assignment


def _kfold(slides: pd.DataFrame, folds: int, seed: int, source: str | None):
    labels = patient_labels(slides)
    _check_class_sizes(labels, folds, f"{folds}-fold cross-validation", source)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    return splitter.split(slides, slides["label"], groups=slides["patient_id"])
