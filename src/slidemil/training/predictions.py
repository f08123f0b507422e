"""Per-fold prediction tables and their metrics (computed by ``slidemil.evaluation.metrics``).

``predictions.csv`` (test part) and ``val_predictions.csv`` (validation part) have the columns
``slide_id, patient_id, label, label_index, fold, prob_<class> ..., predicted`` (and ``site``
after ``patient_id`` when the cohort has a site column); the evaluation stage reads them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from slidemil.evaluation.metrics import SCALAR_METRICS, AbsentClassWarning, compute_metrics
from slidemil.formats.prediction_table import probability_columns


def prediction_table(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    label_indices: Sequence[int],
    probabilities: np.ndarray,
    class_names: Sequence[str],
    fold: int,
    sites: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """One row per slide; ``probabilities`` is (n_slides, n_classes), rows summing to 1;
    ``sites``: each slide's site (None: no ``site`` column)."""
    label_indices = np.asarray(label_indices, dtype=int)
    table = pd.DataFrame(
        {
            "slide_id": list(slide_ids),
            "patient_id": list(patient_ids),
            "label": [class_names[i] for i in label_indices],
            "label_index": label_indices,
            "fold": fold,
        }
    )
    if sites is not None:
        table.insert(2, "site", ["" if site is None else site for site in sites])
    for k, column in enumerate(probability_columns(class_names)):
        table[column] = probabilities[:, k]
    table["predicted"] = [class_names[i] for i in probabilities.argmax(axis=1)]
    return table


def part_metrics(
    label_indices: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    source: str = "",
    warn_absent: bool = True,
) -> dict[str, float]:
    """``accuracy, balanced_accuracy, macro_f1, macro_auc``, then ``recall_<class>`` and
    ``auc_<class>`` of one part's predictions (NaN where undefined, e.g. a class absent from it).

    ``warn_absent=False`` silences the absent-class warning, for the per-epoch validation whose
    classes are announced once per fold instead.
    """
    with warnings.catch_warnings():
        if not warn_absent:
            warnings.simplefilter("ignore", AbsentClassWarning)
        return compute_metrics(label_indices, probabilities, class_names, source=source).scalars()


def undefined_metrics(class_names: Sequence[str]) -> dict[str, float]:
    """The keys of :func:`part_metrics`, all NaN (a fold without test slides)."""
    names = [*SCALAR_METRICS]
    names += [f"recall_{c}" for c in class_names] + [f"auc_{c}" for c in class_names]
    return dict.fromkeys(names, math.nan)
