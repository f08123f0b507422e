"""Decision thresholds for binary tasks, chosen on validation predictions (never on test ones).

Pure functions. A slide is called positive when its positive-class probability is at least the
threshold. ``youden`` maximises sensitivity + specificity - 1 (Youden's J); ``sensitivity`` is
the highest threshold whose sensitivity reaches a target (the most specific rule that finds that
fraction of positives), as a screening use asks for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from sklearn.metrics import roc_curve

OperatingPoint = Literal["argmax", "youden", "sensitivity"]


def choose_threshold(
    positive: Sequence[bool] | np.ndarray,
    scores: np.ndarray,
    rule: OperatingPoint,
    target_sensitivity: float = 0.9,
) -> float:
    """The threshold on ``scores`` (positive-class probabilities, (N,)) that ``rule`` picks from
    validation rows whose truth is ``positive`` (N,). ``argmax`` is 0.5 (the arg-max of two
    probabilities). Raises ``ValueError`` when the rows lack a positive or a negative."""
    if rule == "argmax":
        return 0.5
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if positive.all() or not positive.any():
        raise ValueError("a threshold needs positive and negative validation examples")
    fpr, tpr, thresholds = roc_curve(positive, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first point (nothing positive) has threshold inf
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule == "sensitivity":
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
        return float(thresholds[int(np.argmax(tpr >= target_sensitivity))])
    raise ValueError(f"unknown operating point {rule!r}")


def predict_at_threshold(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Class indices of a binary task: 1 where ``probs[:, 1] >= threshold``, else 0."""
    return (np.asarray(probs)[:, 1] >= threshold).astype(np.int64)


def sensitivity_specificity(
    positive: np.ndarray, predicted_positive: np.ndarray
) -> tuple[float, float]:
    """``(sensitivity, specificity)`` of binary calls; NaN where a side has no example."""
    positive = np.asarray(positive, dtype=bool)
    predicted_positive = np.asarray(predicted_positive, dtype=bool)
    sens = predicted_positive[positive].mean() if positive.any() else np.nan
    spec = (~predicted_positive[~positive]).mean() if (~positive).any() else np.nan
    return float(sens), float(spec)
