"""Bootstrap intervals: known answers, patients resampled together, weighted metrics exact."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from slidemil.evaluation.bootstrap import bootstrap_intervals, resample_weights
from slidemil.evaluation.metrics import AbsentClassWarning, compute_metrics, weighted_metrics

CLASSES = ("normal", "tumour", "necrosis")


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_a_perfect_classifier_has_the_interval_one_to_one():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(30) % 3, 2)  # 30 patients of 2 slides
    probs = softmax(rng.normal(size=(60, 3)) + 8 * np.eye(3)[y])
    assert (probs.argmax(axis=1) == y).all()
    patients = np.repeat([f"p{i}" for i in range(30)], 2)
    ci = bootstrap_intervals(y, probs, CLASSES, patients, resamples=500, seed=1)
    assert set(ci.low) == {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc"} | {
        f"{kind}_{c}" for kind in ("recall", "auc") for c in CLASSES
    }
    for name in ci.low:
        assert ci.interval(name) == (1.0, 1.0), name
    assert ci.groups == 30 and ci.resamples == 500


def test_resampling_patients_gives_wider_intervals_than_slides_when_their_slides_agree():
    # 40 patients of 5 slides; every slide of a patient gets the same (right or wrong) call
    rng = np.random.default_rng(2)
    patients = np.repeat(np.arange(40), 5)
    y = (patients % 2).astype(int)
    right = rng.random(40) < 0.7
    p_true = np.where(right[patients], 0.8, 0.2)
    probs = np.stack(
        [np.where(y == 0, p_true, 1 - p_true), np.where(y == 1, p_true, 1 - p_true)], 1
    )
    by_patient = bootstrap_intervals(y, probs, ("a", "b"), patients, resamples=1000, seed=0)
    by_slide = bootstrap_intervals(y, probs, ("a", "b"), np.arange(200), resamples=1000, seed=0)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        patient_width = np.subtract(*by_patient.interval(name)[::-1])
        slide_width = np.subtract(*by_slide.interval(name)[::-1])
        # the effective sample is 40 patients, not 200 slides: about sqrt(5) times wider
        assert patient_width > 1.6 * slide_width, name
    low, high = by_patient.interval("accuracy")
    assert low < right.mean() < high


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 90)
    probs = softmax(rng.normal(size=(90, 3)) + np.eye(3)[y])
    groups = np.arange(90) // 3
    a = bootstrap_intervals(y, probs, CLASSES, groups, resamples=200, seed=5)
    b = bootstrap_intervals(y, probs, CLASSES, groups, resamples=200, seed=5)
    c = bootstrap_intervals(y, probs, CLASSES, groups, resamples=200, seed=6)
    assert a.low == b.low and a.high == b.high
    assert a.low != c.low
    # group names do not matter, only which rows share a group
    renamed = bootstrap_intervals(y, probs, CLASSES, [f"x{g}" for g in groups], resamples=200,
                                  seed=5)  # fmt: skip
    assert renamed.low == a.low


def test_resample_weights_keep_a_patients_slides_together():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    weights, n = resample_weights(groups, 50, seed=0)
    assert n == 3 and weights.shape == (50, 6)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    # each resample draws 3 patients
    assert (weights[:, [0, 2, 3]].sum(axis=1) == 3).all()


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_weighted_metrics_equal_the_metrics_of_repeated_rows(n_classes):
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, 120)
    probs = softmax(rng.normal(size=(120, n_classes)) + np.eye(n_classes)[y])
    probs = np.round(probs, 2)  # ties, which the AUC counts as one half
    weights = rng.integers(0, 3, size=(6, 120))
    names = [f"c{i}" for i in range(n_classes)]
    values = weighted_metrics(y, probs.argmax(axis=1), probs, weights)
    for b in range(6):
        rows = np.repeat(np.arange(120), weights[b])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AbsentClassWarning)
            expected = compute_metrics(y[rows], probs[rows], names)
        for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
            assert values[name][b] == pytest.approx(getattr(expected, name)), name
        assert np.allclose(values["recall"][b], expected.recall, equal_nan=True)
        assert np.allclose(values["auc"][b], expected.auc, equal_nan=True)


def test_a_class_missing_from_a_resample_is_left_out_of_its_interval():
    # one patient holds the only "necrosis" slides: resamples without it have no recall for it
    y = np.array([0, 0, 1, 1] * 5 + [2, 2])
    probs = np.eye(3)[y] * 0.8 + 0.2 / 3
    groups = np.arange(22) // 2
    ci = bootstrap_intervals(y, probs, CLASSES, groups, resamples=300, seed=0)
    assert ci.interval("recall_necrosis") == (1.0, 1.0)
    assert ci.interval("accuracy") == (1.0, 1.0)


def test_bad_arguments_are_refused():
    y, probs = np.array([0, 1]), np.eye(2)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_intervals(y, probs, ("a", "b"), ["p"], resamples=10)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals(y, probs, ("a", "b"), ["p", "q"], confidence=1.5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals(y, probs, ("a", "b"), ["p", "q"], resamples=0)
