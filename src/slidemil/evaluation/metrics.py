"""Classification metrics from arrays: the one place slidemil computes them (reports and training).

Pure functions over numpy arrays, computed with scikit-learn. A class that is absent from the
true labels has no defined recall or one-vs-rest AUC: those values are NaN, a
:class:`AbsentClassWarning` names the class, and the macro AUC averages the defined classes only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")


def json_number(value: float) -> float | None:
    """A metric value for a JSON file: ``None`` (null) where it is undefined (NaN)."""
    return None if math.isnan(value) else float(value)


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
    y_pred: Sequence[int] | np.ndarray | None = None,
) -> ClassificationMetrics:
    """Accuracy, balanced accuracy, macro F1, per-class recall/precision/F1, one-vs-rest AUC and
    the confusion matrix of predictions ``argmax(probs)`` (or of ``y_pred``).

    Args:
        y_true: (N,) true class indices in ``range(len(class_names))``.
        probs: (N, C) class probabilities (or any scores; only their order per class matters for
            AUC), columns in ``class_names`` order.
        class_names: the C class names.
        source: what is evaluated (e.g. ``"fold 2"``), named in warnings.
        y_pred: (N,) predicted class indices at another operating point (e.g. a threshold on a
            binary task's positive probability); default ``argmax(probs)``. AUCs use ``probs``.

    With 2 classes the macro AUC is the binary AUC of the second (positive) class's probability.
    Otherwise it is the mean of the per-class one-vs-rest AUCs that are defined.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    _check_inputs(y_true, probs, n_classes)
    labels = np.arange(n_classes)
    y_pred = probs.argmax(axis=1) if y_pred is None else _check_pred(y_pred, y_true, n_classes)
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
    curves = {}
    for name, positive, scores in _one_vs_rest(y_true, probs, class_names):
        fpr, tpr, _ = roc_curve(positive, scores)
        curves[name] = (fpr, tpr, float(roc_auc_score(positive, scores)))
    return curves


def precision_recall_curves(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, float, float]]:
    """One-vs-rest precision-recall curves: ``class -> (recall, precision, average precision,
    prevalence)``; the average precision is the area under the step curve (scikit-learn's
    ``average_precision_score``) and the prevalence is the no-skill precision.

    Classes with no positive or no negative example are left out; with 2 classes only the
    positive (second) class is returned.
    """
    curves = {}
    for name, positive, scores in _one_vs_rest(y_true, probs, class_names):
        precision, recall, _ = precision_recall_curve(positive, scores)
        average = float(average_precision_score(positive, scores))
        curves[name] = (recall, precision, average, float(positive.mean()))
    return curves


def _one_vs_rest(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(class name, is-this-class mask, its probabilities)`` of every class with positive and
    negative examples; with 2 classes only the positive (second) class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check_inputs(y_true, probs, len(class_names))
    for c in [1] if len(class_names) == 2 else range(len(class_names)):
        positive = y_true == c
        if positive.any() and not positive.all():
            yield str(class_names[c]), positive, probs[:, c]


def weighted_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The metrics of :func:`compute_metrics` for B weightings of the same N predictions at once.

    ``weights`` (B, N) holds non-negative row weights; integer weights give exactly the metrics
    of the predictions with each row repeated that many times, which is how a bootstrap
    resample (rows drawn with replacement) is evaluated without building it. Returns ``name ->
    (B,)`` for ``accuracy, balanced_accuracy, macro_f1, macro_auc`` and ``name -> (B, C)`` for
    ``recall`` and ``auc``; NaN where undefined, by the same rules as :func:`compute_metrics`
    (recall and AUC of a class without true examples; AUC of a class that is all the rows).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_classes = probs.shape[1]
    _check_inputs(y_true, probs, n_classes)
    _check_pred(y_pred, y_true, n_classes)
    if weights.shape[1] != len(y_true):
        raise ValueError(f"weights must have shape (B, {len(y_true)}), got {weights.shape}")

    # confusion (B, C, C): weight of every (true, predicted) pair
    cell = y_true * n_classes + y_pred
    one_hot = np.zeros((len(y_true), n_classes * n_classes))
    one_hot[np.arange(len(y_true)), cell] = 1.0
    confusion = (weights @ one_hot).reshape(-1, n_classes, n_classes)
    support = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    total = support.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * hits / (support + predicted), np.nan)
        accuracy = hits.sum(axis=1) / total
    balanced = _nanmean_rows(recall)
    macro_f1 = _nanmean_rows(f1)  # classes in y_true or y_pred, F1 = 0 when never right

    auc = np.stack(
        [_weighted_auc(y_true == c, probs[:, c], weights) for c in range(n_classes)], axis=1
    )
    macro_auc = auc[:, 1] if n_classes == 2 else _nanmean_rows(auc)
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "macro_auc": macro_auc,
        "recall": recall,
        "auc": auc,
    }


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under B row weightings: the weighted fraction of (positive, negative) pairs
    ordered right, ties counting one half (as ``roc_auc_score``). (B,); NaN without both."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # (B, distinct scores)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each score
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs, np.nan)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    defined = np.isfinite(values)
    count = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(defined, values, 0).sum(axis=1) / count, np.nan)


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


def _check_pred(y_pred, y_true: np.ndarray, n_classes: int) -> np.ndarray:
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"y_pred must have shape {y_true.shape}, got {y_pred.shape}")
    if len(y_pred) and (y_pred.min() < 0 or y_pred.max() >= n_classes):
        raise ValueError(f"y_pred has class indices outside 0..{n_classes - 1}")
    return y_pred
