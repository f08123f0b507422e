"""Bootstrap confidence intervals of classification metrics, resampling groups (patients).

Pure functions. A resample draws as many groups as there are, with replacement, and keeps every
row of a drawn group as often as the group was drawn, so slides of one patient stay together (they
are not independent: resampling slides would give intervals that are too narrow). Each resample
is evaluated by :func:`slidemil.evaluation.metrics.weighted_metrics` with the draw counts as row
weights, all resamples in one vectorised pass; the interval is the percentile interval of the
resampled values. Resamples in which a metric is undefined (a class drawn without any true
example) are left out of that metric's interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slidemil.evaluation.metrics import weighted_metrics


@dataclass(frozen=True)
class ConfidenceIntervals:
    """Percentile intervals keyed like ``ClassificationMetrics.scalars()`` (``accuracy``,
    ``balanced_accuracy``, ``macro_f1``, ``macro_auc``, ``recall_<class>``, ``auc_<class>``)."""

    low: dict[str, float]
    high: dict[str, float]
    resamples: int
    confidence: float
    groups: int  # distinct groups resampled (patients, or slides when resampling slides)

    def interval(self, name: str) -> tuple[float, float]:
        return self.low[name], self.high[name]


def resample_weights(
    groups: Sequence[str] | np.ndarray, resamples: int, seed: int
) -> tuple[np.ndarray, int]:
    """Row weights of ``resamples`` group bootstrap draws: ``(weights (B, N), n_groups)``.

    ``groups`` (N,) names each row's group; a row's weight in a resample is how many times its
    group was drawn. The draws depend only on ``seed`` and the groups' order of first appearance.
    """
    _, first, index = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    # number groups by first appearance so the draw does not depend on how names sort
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    n_groups = len(first)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)
    return counts[:, rank[index]].astype(np.float64), n_groups


def bootstrap_intervals(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[str] | np.ndarray,
    *,
    y_pred: Sequence[int] | np.ndarray | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceIntervals:
    """Percentile bootstrap intervals of accuracy, balanced accuracy, macro F1, macro AUC and
    per-class recall and AUC, resampling ``groups`` (pass patient ids; slide ids resample slides).

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) class probabilities, columns in ``class_names`` order.
        class_names: the C class names (keys ``recall_<class>``, ``auc_<class>``).
        groups: (N,) the resampled unit of each row.
        y_pred: (N,) predicted classes at the chosen operating point (default arg-max); kept
            fixed in every resample (a threshold is not re-chosen per resample).
        resamples: number of bootstrap resamples B.
        confidence: interval coverage, e.g. 0.95 for the 2.5th and 97.5th percentiles.
        seed: seed of the draws; the same seed and data give the same intervals.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(groups) != len(y_true):
        raise ValueError(f"groups must have {len(y_true)} entries, got {len(groups)}")
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=np.int64)
    weights, n_groups = resample_weights(groups, resamples, seed)
    values = weighted_metrics(y_true, y_pred, probs, weights)
    columns: dict[str, np.ndarray] = {
        name: values[name] for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
    }
    for kind in ("recall", "auc"):
        for c, name in enumerate(class_names):
            columns[f"{kind}_{name}"] = values[kind][:, c]
    tail = 100 * (1 - confidence) / 2
    low, high = {}, {}
    for name, column in columns.items():
        defined = column[np.isfinite(column)]
        if len(defined) == 0:
            low[name] = high[name] = float("nan")
            continue
        low[name], high[name] = (float(v) for v in np.percentile(defined, [tail, 100 - tail]))
    return ConfidenceIntervals(low, high, resamples, confidence, n_groups)
