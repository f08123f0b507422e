"""Per-fold prediction tables and the metrics computed from them.

``predictions.csv`` (test part) and ``val_predictions.csv`` (validation part) have the columns
``slide_id, patient_id, label, label_index, fold, prob_<class> ..., predicted``; the evaluation
stage reads them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score


def prediction_table(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    label_indices: Sequence[int],
    probabilities: np.ndarray,
    class_names: Sequence[str],
    fold: int,
) -> pd.DataFrame:
    """One row per slide; ``probabilities`` is (n_slides, n_classes), rows summing to 1."""
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
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = probabilities[:, k]
    table["predicted"] = [class_names[i] for i in probabilities.argmax(axis=1)]
    return table


def classification_metrics(
    label_indices: np.ndarray, probabilities: np.ndarray, n_classes: int
) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1 and one-vs-rest macro AUC (NaN when undefined,
    e.g. a class absent from the labels)."""
    labels = np.asarray(label_indices, dtype=int)
    predicted = probabilities.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", UserWarning)  # balanced accuracy with absent classes
        metrics = {
            "accuracy": float(accuracy_score(labels, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
            "macro_f1": float(
                f1_score(labels, predicted, average="macro", labels=list(range(n_classes)))
            ),
        }
    metrics["auc"] = _auc(labels, probabilities, n_classes)
    return metrics


def _auc(labels: np.ndarray, probabilities: np.ndarray, n_classes: int) -> float:
    if len(np.unique(labels)) < n_classes:
        return math.nan
    try:
        if n_classes == 2:
            return float(roc_auc_score(labels, probabilities[:, 1]))
        return float(
            roc_auc_score(labels, probabilities, multi_class="ovr", labels=list(range(n_classes)))
        )
    except ValueError:
        return math.nan
