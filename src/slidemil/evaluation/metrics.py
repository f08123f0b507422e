"""Classification metrics from arrays: the one place slidemil computes them (reports and training).

Pure functions over numpy arrays, computed with scikit-learn. A class that is absent from the
true labels has no defined recall or one-vs-rest AUC: those values are NaN, a
:class:`AbsentClassWarning` names the class, and the macro AUC averages the defined classes only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


class AbsentClassWarning(UserWarning):
    """A class has no true example in the evaluated set, so its recall and AUC are undefined."""


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of one set of predictions (one fold, or several pooled).

    Per-class arrays have one entry per class in ``class_names`` order; NaN marks an undefined
    value (no true example of the class, or, for precision, no prediction of it).
    """

    class_names: tuple[str, ...]
    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    macro_auc: float
    support: np.ndarray  # (C,) true examples per class
    recall: np.ndarray  # (C,) per-class accuracy
    precision: np.ndarray  # (C,)
    f1: np.ndarray  # (C,)
    auc: np.ndarray  # (C,) one-vs-rest ROC AUC
    confusion: np.ndarray  # (C, C) counts, rows = true class, columns = predicted class

    @property
    def confusion_normalised(self) -> np.ndarray:
        """Confusion matrix with each row divided by its total (NaN rows for absent classes)."""
        return normalise_rows(self.confusion)

    @property
    def absent_classes(self) -> tuple[str, ...]:
        return tuple(name for name, s in zip(self.class_names, self.support, strict=True) if s == 0)

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> value`` map: the four summary metrics, then ``recall_<class>`` and
        ``auc_<class>`` for every class (handy for ``history.csv`` columns and tables)."""
        values = {name: float(getattr(self, name)) for name in SCALAR_METRICS}
        values.update(
            {f"recall_{c}": float(v) for c, v in zip(self.class_names, self.recall, strict=True)}
        )
        values.update(
            {f"auc_{c}": float(v) for c, v in zip(self.class_names, self.auc, strict=True)}
        )
        return values

    def per_class_frame(self) -> pd.DataFrame:
        """One row per class: class, support, recall, precision, f1, auc."""
        return pd.DataFrame(
            {
                "class": list(self.class_names),
                "support": self.support.astype(int),
                "recall": self.recall,
                "precision": self.precision,
                "f1": self.f1,
                "auc": self.auc,
            }
        )


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    source: str = "",
) -> ClassificationMetrics:
    """Accuracy, balanced accuracy, macro F1, per-class recall/precision/F1, one-vs-rest AUC and
    the confusion matrix of predictions ``argmax(probs)``.

    Args:
        y_true: (N,) true class indices in ``range(len(class_names))``.
        probs: (N, C) class probabilities (or any scores; only their order per class matters for
            AUC), columns in ``class_names`` order.
        class_names: the C class names.
        source: what is evaluated (e.g. ``"fold 2"``), named in warnings.

    With 2 classes the macro AUC is the binary AUC of the second (positive) class's probability.
    Otherwise it is the mean of the per-class one-vs-rest AUCs that are defined.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    _check_inputs(y_true, probs, n_classes)
    labels = np.arange(n_classes)
    y_pred = probs.argmax(axis=1)
    support = np.bincount(y_true, minlength=n_classes)

    absent = [str(class_names[c]) for c in labels if support[c] == 0]
    if absent:
        where = f"{source}: " if source else ""
        warnings.warn(
            f"{where}no true example of class(es) {', '.join(absent)}: their recall and AUC are "
            "not defined (NaN); macro AUC averages the other classes",
            AbsentClassWarning,
            stacklevel=2,
        )

    with warnings.catch_warnings():
        # Absent classes are reported once above, as AbsentClassWarning; sklearn's own warnings
        # about them (and about never-predicted classes) would only repeat it.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        balanced = balanced_accuracy_score(y_true, y_pred)
        recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
        precision = precision_score(
            y_true, y_pred, labels=labels, average=None, zero_division=np.nan
        )
        f1 = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
        macro_f1 = f1_score(y_true, y_pred, average="macro", zero_division=0.0)
    auc = np.array([_one_vs_rest_auc(y_true, probs[:, c], c) for c in labels])
    if n_classes == 2:
        macro_auc = auc[1]
    else:
        macro_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
    return ClassificationMetrics(
        class_names=tuple(str(c) for c in class_names),
        n=len(y_true),
        accuracy=float(accuracy_score(y_true, y_pred)),
        balanced_accuracy=float(balanced),
        macro_f1=float(macro_f1),
        macro_auc=float(macro_auc),
        support=support,
        recall=np.asarray(recall, dtype=np.float64),
        precision=np.asarray(precision, dtype=np.float64),
        f1=np.asarray(f1, dtype=np.float64),
        auc=auc,
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
    )


def roc_curves(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """One-vs-rest ROC curves: ``class -> (false positive rate, true positive rate, AUC)``.

    Classes whose curve is undefined (no positive or no negative example) are left out. With 2
    classes only the positive (second) class is returned: its curve is the binary ROC curve.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, len(class_names))
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    curves = {}
    for c in classes:
        positive = y_true == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        curves[str(class_names[c])] = (fpr, tpr, float(roc_auc_score(positive, probs[:, c])))
    return curves


def normalise_rows(confusion: np.ndarray) -> np.ndarray:
    """Divide each row of a confusion matrix by its total; rows with no example become NaN."""
    confusion = np.asarray(confusion, dtype=np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, confusion / np.where(totals > 0, totals, 1), np.nan)


def _one_vs_rest_auc(y_true: np.ndarray, scores: np.ndarray, positive_class: int) -> float:
    positive = y_true == positive_class
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probs must have shape (N, {n_classes}), got {probs.shape}")
    if y_true.ndim != 1 or len(y_true) != len(probs):
        raise ValueError(f"y_true must have shape ({len(probs)},), got {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("no predictions to evaluate")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true has class indices outside 0..{n_classes - 1}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
