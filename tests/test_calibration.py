"""Calibration: ECE and Brier on predictors of known calibration, temperature scaling,
calibration.json, and thresholds chosen on validation predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slidemil.errors import ArtifactError
from slidemil.evaluation.calibration import (
    apply_temperature,
    brier_score,
    class_calibration_errors,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from slidemil.evaluation.calibration_file import load_temperature, write_calibration
from slidemil.evaluation.operating_point import (
    choose_threshold,
    predict_at_threshold,
    sensitivity_specificity,
)


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def calibrated_sample(n, n_classes=3, seed=0, scale=1.5):
    """Probabilities from random logits, and labels drawn from those very probabilities: a
    perfectly calibrated predictor."""
    rng = np.random.default_rng(seed)
    probs = softmax(scale * rng.normal(size=(n, n_classes)))
    y = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return y, probs


def test_a_calibrated_predictor_has_an_ece_near_zero_and_an_overconfident_one_does_not():
    y, probs = calibrated_sample(20_000)
    assert expected_calibration_error(y, probs, bins=10) < 0.015
    assert (class_calibration_errors(y, probs, bins=10) < 0.015).all()
    overconfident = apply_temperature(probs, 0.3)  # logits x 3.3
    assert expected_calibration_error(y, overconfident, bins=10) > 0.1
    assert brier_score(y, overconfident) > brier_score(y, probs)


def test_reliability_bins_hold_equal_numbers_of_predictions():
    rng = np.random.default_rng(1)
    p = rng.beta(0.3, 0.3, 1000)  # crowded near 0 and 1, as MIL outputs are
    curve = reliability_curve(rng.random(1000) < p, p, bins=8)
    assert curve.count.tolist() == [125] * 8
    assert (np.diff(curve.predicted) > 0).all()
    few = reliability_curve([True, False, True], np.array([0.9, 0.2, 0.6]), bins=10)
    assert len(few.count) == 3  # fewer rows than bins: a bin per row


def test_brier_score_of_known_cases():
    assert brier_score([0, 1], np.eye(2)) == 0.0
    assert brier_score([0, 1], np.full((2, 2), 0.5)) == pytest.approx(0.5)
    assert brier_score([0], np.array([[0.0, 1.0]])) == pytest.approx(2.0)


def test_temperature_scaling_lowers_the_ece_on_a_held_out_part():
    y, probs = calibrated_sample(6000, seed=2)
    overconfident = apply_temperature(probs, 1 / 3)  # the model's logits are 3x too large
    validation, test = slice(0, 3000), slice(3000, None)
    temperature = fit_temperature(y[validation], overconfident[validation])
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(y[test], overconfident[test])
    after = expected_calibration_error(y[test], apply_temperature(overconfident[test], temperature))
    assert after < 0.5 * before and after < 0.03
    # scaling never changes the predicted class
    scaled = apply_temperature(overconfident, temperature)
    assert (scaled.argmax(axis=1) == overconfident.argmax(axis=1)).all()
    assert np.allclose(apply_temperature(probs, 1.0), probs)


def test_an_underconfident_model_gets_a_temperature_below_one():
    y, probs = calibrated_sample(4000, seed=3)
    assert fit_temperature(y, apply_temperature(probs, 2.0)) == pytest.approx(0.5, rel=0.1)


def test_calibration_file_round_trip_and_a_retrained_fold_is_refused(tmp_path):
    fold = tmp_path / "fold_0"
    fold.mkdir()
    with pytest.raises(ArtifactError, match="no calibration fitted"):
        load_temperature(fold)
    assert load_temperature(fold, required=False) is None
    (fold / "checkpoint_best.pt").write_bytes(b"weights v1")
    path = write_calibration(fold, 1.7, {"fitted_on": "val_predictions.csv"})
    record = json.loads(path.read_text())
    assert record["format_version"] == 1 and record["method"] == "temperature"
    assert load_temperature(fold) == pytest.approx(1.7)
    (fold / "checkpoint_best.pt").write_bytes(b"weights v2")
    with pytest.raises(ArtifactError, match=r"another checkpoint_best\.pt") as error:
        load_temperature(fold)
    assert "calibrate temperature" in str(error.value)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        load_temperature(fold)


def test_youden_threshold_separates_the_validation_classes():
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6])
    positive = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    assert choose_threshold(positive, scores, "youden") == pytest.approx(0.35)
    assert choose_threshold(positive, scores, "argmax") == 0.5
    calls = predict_at_threshold(np.stack([1 - scores, scores], axis=1), 0.35)
    assert sensitivity_specificity(positive, calls == 1) == (1.0, 1.0)


def test_a_target_sensitivity_is_reached_with_the_highest_threshold():
    rng = np.random.default_rng(4)
    positive = rng.random(400) < 0.4
    scores = np.clip(0.5 + 0.25 * (positive - 0.5) + 0.2 * rng.normal(size=400), 0, 1)
    for target in (0.8, 0.95):
        threshold = choose_threshold(positive, scores, "sensitivity", target)
        sensitivity, _ = sensitivity_specificity(positive, scores >= threshold)
        assert sensitivity >= target
        # any higher threshold misses the target
        higher = np.min(scores[scores > threshold])
        assert sensitivity_specificity(positive, scores >= higher)[0] < target
    with pytest.raises(ValueError, match="positive and negative"):
        choose_threshold(np.ones(3, dtype=bool), np.ones(3), "youden")
