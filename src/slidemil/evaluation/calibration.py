"""Calibration of class probabilities: ECE, Brier score, reliability curves, temperature scaling.

Pure functions over numpy arrays. Does p = 0.9 mean 90%? The reliability curve bins predictions
by their probability and compares each bin's mean probability with the fraction of them that is
right; the expected calibration error (ECE) is the size-weighted mean gap. Bins hold equal
numbers of predictions ("equal mass"), so no bin is nearly empty when probabilities crowd near 0
or 1, as a MIL model's do.

Temperature scaling divides the logits by one scalar T > 0 fitted to minimise the negative
log-likelihood of held-out predictions (Guo et al. 2017); T > 1 softens an overconfident model.
The logarithm of a softmax output is the logit vector up to a per-row constant, and softmax
ignores such constants, so ``softmax(log p / T)`` is exact temperature scaling of stored
probabilities. It never changes the arg-max, so accuracy and AUC stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

# Probabilities are clipped to this before taking logs: a stored 0 is "below 1e-12", not -inf.
MIN_PROBABILITY = 1e-12
# Temperatures searched when fitting (log-uniform bounds).
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per equal-mass bin: mean predicted probability, observed frequency, and row count."""

    predicted: np.ndarray  # (bins,) mean probability (confidence) in the bin
    observed: np.ndarray  # (bins,) fraction of the bin's rows that are positive / right
    count: np.ndarray  # (bins,) rows in the bin

    @property
    def ece(self) -> float:
        """Size-weighted mean |observed - predicted| over bins."""
        total = self.count.sum()
        gaps = np.abs(self.observed - self.predicted)
        return float((self.count * gaps).sum() / total) if total else float("nan")


def reliability_curve(
    outcomes: Sequence[bool] | np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> ReliabilityCurve:
    """Equal-mass reliability curve of binary ``outcomes`` (N,) against ``probabilities`` (N,).

    Rows are sorted by probability and split into ``bins`` groups of (as nearly as possible)
    equal size; with fewer rows than bins, every row is a bin.
    """
    outcomes = np.asarray(outcomes, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if outcomes.shape != probabilities.shape or outcomes.ndim != 1:
        raise ValueError("outcomes and probabilities must be 1-d arrays of the same length")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if len(outcomes) == 0:
        raise ValueError("no predictions to calibrate")
    order = np.argsort(probabilities, kind="stable")
    parts = [part for part in np.array_split(order, min(bins, len(order))) if len(part)]
    return ReliabilityCurve(
        predicted=np.array([probabilities[part].mean() for part in parts]),
        observed=np.array([outcomes[part].mean() for part in parts]),
        count=np.array([len(part) for part in parts]),
    )


def confidence_curve(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> ReliabilityCurve:
    """Reliability of the top-label confidence: ``max(probs)`` against ``argmax == y_true``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return reliability_curve(probs.argmax(axis=1) == y_true, probs.max(axis=1), bins)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE (the overall figure): equal-mass bins of ``max(probs)``, each bin's gap
    between mean confidence and accuracy, weighted by its size. 0 = calibrated; in [0, 1]."""
    return confidence_curve(y_true, probs, bins).ece


def class_calibration_errors(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> np.ndarray:
    """One-vs-rest ECE per class (C,): equal-mass bins of ``probs[:, c]`` against ``y == c``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return np.array(
        [reliability_curve(y_true == c, probs[:, c], bins).ece for c in range(probs.shape[1])]
    )


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of ``sum_c (p_c - [y == c])²``; 0 is perfect,
    2 the worst (with 2 classes it is twice the binary Brier score of the positive class)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    one_hot = np.eye(probs.shape[1])[y_true]
    return float(((probs - one_hot) ** 2).sum(axis=1).mean())


def negative_log_likelihood(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean ``-log p(true class)`` (natural log), probabilities clipped at 1e-12."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], MIN_PROBABILITY, 1)).mean())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise: temperature-scaled probabilities, (N, C)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), MIN_PROBABILITY, 1.0))
    scaled = logits / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of ``apply_temperature(probs,
    T)`` on these (validation) predictions, searched in [0.05, 20].

    The likelihood is a convex function of 1/T, so the bounded 1-d search finds its minimum.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("no predictions to fit a temperature on")
    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(y_true, apply_temperature(probs, np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))
