"""Evaluation: metrics equal scikit-learn's, report files with intervals, levels, operating
points, calibration, external cohorts, absent classes, missing folds, CLI, and a real run
calibrated by evaluate and applied by predict."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.image import imread
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from typer.testing import CliRunner

from slidemil.errors import ArtifactError, ConfigError
from slidemil.evaluation import (
    AbsentClassWarning,
    compute_metrics,
    evaluate,
    expected_calibration_error,
)
from slidemil.evaluation.config import EvaluateConfig

# --- a run folder as the training stage writes it ------------------------------------------------


def write_run(
    root,
    class_names,
    *,
    folds=3,
    slides_per_fold=24,
    missing=(),
    absent=None,
    seed=0,
    signal=2.0,
    sharpness=1.0,
    validation=False,
):
    """Write ``root`` as a training run with random but controlled predictions.

    Each patient has 2 slides of one label; ``absent`` maps a fold to a class index left out of
    its test part; folds in ``missing`` get a folder with a history but no predictions.
    ``sharpness`` multiplies the logits (> 1: an overconfident model); ``validation`` also
    writes a ``val_predictions.csv`` per fold drawn the same way.
    """
    rng = np.random.default_rng(seed)
    n_classes = len(class_names)
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.json").write_text(
        json.dumps({"class_names": list(class_names), "folds": folds, "encoder": "e", "model": "m"})
    )
    (root / "config.yaml").write_text(f"train:\n  folds: {folds}\n")
    split_rows = []
    for fold in range(folds):
        fold_dir = root / f"fold_{fold}"
        fold_dir.mkdir()
        epochs = np.arange(6)
        pd.DataFrame(
            {
                "epoch": epochs,
                "train_loss": 1.5 * np.exp(-epochs / 3) + 0.1 * rng.random(6),
                "val_loss": 1.6 * np.exp(-epochs / 4) + 0.1 * rng.random(6),
                "val_balanced_accuracy": 1 - 0.6 * np.exp(-epochs / 2),
                "lr": 1e-4,
                "seconds": 1.0,
            }
        ).to_csv(fold_dir / "history.csv", index=False)
        if fold in missing:
            continue
        classes = [c for c in range(n_classes) if not (absent and absent.get(fold) == c)]
        parts = [("val_predictions.csv", "v")] if validation else []
        for name, tag in [*parts, ("predictions.csv", "")]:  # the test part last
            labels = np.repeat([classes[i % len(classes)] for i in range(slides_per_fold // 2)], 2)
            logits = rng.normal(size=(len(labels), n_classes)) + signal * np.eye(n_classes)[labels]
            logits *= sharpness
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            frame = pd.DataFrame(
                {
                    "slide_id": [f"f{fold}{tag}_s{i:03d}" for i in range(len(labels))],
                    "patient_id": [f"f{fold}{tag}_p{i // 2:03d}" for i in range(len(labels))],
                    "label": [class_names[i] for i in labels],
                    "label_index": labels,
                    "fold": fold,
                    **{f"prob_{c}": probs[:, i] for i, c in enumerate(class_names)},
                    "predicted": [class_names[i] for i in probs.argmax(axis=1)],
                }
            )
            frame.to_csv(fold_dir / name, index=False)
        (fold_dir / "metrics.json").write_text("{}")
        split_rows += [(s, fold, "test") for s in frame["slide_id"]]
    pd.DataFrame(split_rows, columns=["slide_id", "fold", "split"]).to_csv(
        root / "splits.csv", index=False
    )
    return root


def fold_arrays(run, fold, class_names):
    frame = pd.read_csv(run / f"fold_{fold}" / "predictions.csv")
    return frame["label_index"].to_numpy(), frame[[f"prob_{c}" for c in class_names]].to_numpy()


CLASSES_3 = ("normal", "tumour", "necrosis")
CLASSES_8 = tuple(f"class_{i}" for i in range(8))


# --- metrics from arrays -------------------------------------------------------------------------


def test_tiny_case_checked_by_hand():
    # p(class 1) = .1 .8 .7 .9 for true 0 0 1 1 -> predicted 0 1 1 1
    p1 = np.array([0.1, 0.8, 0.7, 0.9])
    m = compute_metrics([0, 0, 1, 1], np.stack([1 - p1, p1], axis=1), ["a", "b"])
    assert m.accuracy == pytest.approx(0.75)
    assert m.recall.tolist() == pytest.approx([0.5, 1.0])
    assert m.balanced_accuracy == pytest.approx(0.75)
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)
    assert m.macro_auc == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered right
    assert m.confusion.tolist() == [[1, 1], [0, 2]]
    assert np.allclose(m.confusion_normalised, [[0.5, 0.5], [0.0, 1.0]])


def test_metrics_equal_sklearn_for_8_classes():
    rng = np.random.default_rng(1)
    y = np.arange(200) % 8
    logits = rng.normal(size=(200, 8)) + 1.5 * np.eye(8)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    m = compute_metrics(y, probs, CLASSES_8)
    assert m.accuracy == pytest.approx(accuracy_score(y, pred))
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert m.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    assert np.allclose(m.recall, recall_score(y, pred, average=None, labels=range(8)))
    assert m.macro_auc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert (m.confusion == confusion_matrix(y, pred, labels=range(8))).all()
    assert m.support.tolist() == [25] * 8
    assert 0.3 < m.accuracy < 1.0  # the controlled signal is neither absent nor perfect


def test_absent_class_gives_nan_auc_and_warning():
    rng = np.random.default_rng(2)
    y = np.array([0, 1, 3] * 10)  # class 2 absent
    probs = rng.dirichlet(np.ones(4), size=30)
    with pytest.warns(AbsentClassWarning, match="fold 7.*class_2"):
        m = compute_metrics(y, probs, CLASSES_8[:4], source="fold 7")
    assert math.isnan(m.auc[2]) and math.isnan(m.recall[2])
    expected = [roc_auc_score(y == c, probs[:, c]) for c in (0, 1, 3)]
    assert np.allclose(m.auc[[0, 1, 3]], expected)
    assert m.macro_auc == pytest.approx(np.mean(expected))
    assert m.absent_classes == ("class_2",)


def test_binary_auc_uses_positive_class_probability():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    m = compute_metrics(y, np.stack([1 - p1, p1], axis=1), ["neg", "pos"])
    assert m.macro_auc == pytest.approx(roc_auc_score(y, p1))


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics([0, 1], np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 2], np.ones((2, 2)), ["a", "b"])


# --- evaluate(): reading a run, writing the report -----------------------------------------------


def slide_rows(metrics, level="slide"):
    """The internal rows of one level of metrics.csv, indexed by fold."""
    rows = metrics[(metrics["cohort"] == "internal") & (metrics["level"] == level)]
    return rows.set_index(rows["fold"].astype(str))


def test_report_of_a_3_class_run(tmp_path, capsys):
    run = write_run(tmp_path / "exp1", CLASSES_3, folds=3)
    report = evaluate(run, plots=False)  # figures: test_plots_are_real_pngs
    out = run / "report"
    assert report.out_dir == out and report.folds == (0, 1, 2) and report.missing_folds == ()
    assert report.levels == ("slide", "patient")  # patients have 2 slides: both levels

    metrics = pd.read_csv(out / "metrics.csv", dtype={"fold": str})
    slides = slide_rows(metrics)
    assert slides.index.tolist() == ["0", "1", "2", "mean", "std", "pooled"]
    for fold in range(3):
        y, probs = fold_arrays(run, fold, CLASSES_3)
        row = slides.loc[str(fold)]
        pred = probs.argmax(axis=1)
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert row["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert row["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
        assert row["accuracy_ci_low"] <= row["accuracy"] <= row["accuracy_ci_high"]
    folds = slides.loc[["0", "1", "2"]]
    for column in ("accuracy", "macro_auc", "recall_tumour", "auc_necrosis", "ece"):
        assert slides.loc["mean", column] == pytest.approx(folds[column].mean())
        assert slides.loc["std", column] == pytest.approx(folds[column].std(ddof=1))
    assert report.mean_std("accuracy") == pytest.approx(
        (folds["accuracy"].mean(), folds["accuracy"].std(ddof=1))
    )
    # pooled out-of-fold: every fold's test slides together
    y = np.concatenate([fold_arrays(run, f, CLASSES_3)[0] for f in range(3)])
    probs = np.concatenate([fold_arrays(run, f, CLASSES_3)[1] for f in range(3)])
    pooled = slides.loc["pooled"]
    assert pooled["n"] == 72
    assert pooled["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert pooled["macro_auc_ci_low"] < pooled["macro_auc"] < pooled["macro_auc_ci_high"]
    # intervals of the pooled 72 slides are narrower than those of a fold's 24
    width = slides["accuracy_ci_high"] - slides["accuracy_ci_low"]
    assert width["pooled"] < width[["0", "1", "2"]].min()

    per_class = pd.read_csv(out / "per_class.csv", dtype={"fold": str})
    slide_classes = per_class[per_class["level"] == "slide"]
    assert len(slide_classes) == 3 * 3 + 2 * 3 + 3  # folds, mean and std, pooled
    assert slide_classes[slide_classes["fold"] == "0"]["support"].sum() == 24
    assert {"recall_ci_low", "auc_ci_high", "ece"} <= set(per_class.columns)

    predictions = pd.read_csv(out / "predictions.csv")
    slide_predictions = predictions[predictions["level"] == "slide"]
    assert len(slide_predictions) == 72 and set(slide_predictions["fold"]) == {0, 1, 2}
    assert {"slide_id", "patient_id", "label", "prob_necrosis", "predicted"} <= set(predictions)
    assert len(predictions[predictions["level"] == "patient"]) == 36

    confusion = pd.read_csv(out / "confusion_matrices.csv")
    summed = confusion[(confusion["fold"] == "sum") & (confusion["level"] == "slide")]
    summed = summed["count"].to_numpy().reshape(3, 3)
    assert (summed == report.summed_confusion).all() and summed.sum() == 72

    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0, 1, 2] and summary["missing_folds"] == []
    assert summary["bootstrap"]["resamples"] == 1000 and summary["bootstrap"]["unit"] == "patient"
    accuracy = next(r for r in summary["metrics"]["slide"] if r["metric"] == "accuracy")
    assert accuracy["pooled"]["low"] <= accuracy["pooled"]["value"] <= accuracy["pooled"]["high"]
    markdown = (out / "summary.md").read_text()
    assert "±" in markdown and "95% CI" in markdown and "## Patient level" in markdown
    low, high = pooled["accuracy_ci_low"], pooled["accuracy_ci_high"]
    assert f"{pooled['accuracy']:.3f} [{low:.3f}, {high:.3f}]" in markdown
    resolved = yaml.safe_load((out / "evaluate_config.yaml").read_text())
    assert resolved["evaluate"]["level"] == "both"

    printed = capsys.readouterr().out
    assert "mean ± std" in printed and "balanced_accuracy" in printed and "95% CI" in printed


def test_intervals_are_seeded_and_can_be_turned_off(tmp_path):
    run = write_run(tmp_path / "seeded", CLASSES_3, folds=2)
    first = evaluate(run, quiet=True, plots=False, bootstrap=200, seed=3)
    again = evaluate(run, quiet=True, plots=False, bootstrap=200, seed=3)
    pd.testing.assert_frame_equal(first.metrics, again.metrics)
    other = evaluate(run, quiet=True, plots=False, bootstrap=200, seed=4)
    assert not first.metrics["accuracy_ci_low"].equals(other.metrics["accuracy_ci_low"])
    none = evaluate(run, quiet=True, plots=False, bootstrap=0)
    assert not [c for c in none.metrics.columns if c.endswith("_ci_low")]


def _assert_real_png(path):
    assert path.is_file() and path.stat().st_size > 10_000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # not a single colour


FIGURES = ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png")


def test_plots_are_real_pngs(tmp_path):
    run = write_run(tmp_path / "exp", CLASSES_3, folds=2)
    evaluate(run, quiet=True, bootstrap=50)
    report = run / "report"
    names = [*FIGURES, *(f"reliability_{c}.png" for c in CLASSES_3)]
    for folder in (report, report / "patient"):
        for name in names:
            _assert_real_png(folder / name)
    _assert_real_png(report / "training_curves.png")
    assert not list(report.rglob(".*tmp-*"))  # atomic writes left no temp file


def test_two_class_run(tmp_path):
    classes = ("benign", "malignant")
    run = write_run(tmp_path / "binary", classes, folds=2)
    report = evaluate(run, quiet=True, plots=False, bootstrap=50)
    for fold in range(2):
        y, probs = fold_arrays(run, fold, classes)
        assert report.result(fold).metrics.macro_auc == pytest.approx(roc_auc_score(y, probs[:, 1]))


def test_eight_classes_with_a_class_absent_from_one_fold(tmp_path):
    run = write_run(tmp_path / "eight", CLASSES_8, folds=3, slides_per_fold=32, absent={1: 5})
    with pytest.warns(AbsentClassWarning, match="fold 1.*class_5"):
        report = evaluate(run, quiet=True, level="slide", bootstrap=100)
    metrics = slide_rows(report.metrics)
    assert math.isnan(metrics.at["1", "auc_class_5"])
    assert math.isnan(metrics.at["1", "recall_class_5"])
    assert math.isnan(metrics.at["1", "auc_class_5_ci_low"])
    defined = [metrics.at["1", f"auc_{c}"] for c in CLASSES_8 if c != "class_5"]
    assert metrics.at["1", "macro_auc"] == pytest.approx(np.mean(defined))
    # the mean over folds of the absent class's AUC uses the folds where it is defined
    assert metrics.at["mean", "auc_class_5"] == pytest.approx(
        np.mean([metrics.at["0", "auc_class_5"], metrics.at["2", "auc_class_5"]])
    )
    per_class = pd.read_csv(run / "report" / "per_class.csv", dtype={"fold": str})
    row = per_class[(per_class["fold"] == "1") & (per_class["class"] == "class_5")]
    assert row["support"].item() == 0 and math.isnan(row["auc"].item())
    _assert_real_png(run / "report" / "confusion_matrix.png")


def test_missing_fold_reports_the_others(tmp_path):
    run = write_run(tmp_path / "partial", CLASSES_3, folds=3, missing=(1,))
    report = evaluate(run, quiet=True, plots=False, level="slide", bootstrap=50)
    assert report.folds == (0, 2) and report.missing_folds == (1,)
    metrics = pd.read_csv(run / "report" / "metrics.csv", dtype={"fold": str})
    assert metrics["fold"].tolist() == ["0", "2", "mean", "std", "pooled"]
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["missing_folds"] == [1]


def test_patient_level_means_slide_probabilities(tmp_path):
    run = write_run(tmp_path / "patients", CLASSES_3, folds=2)
    out = tmp_path / "patient_report"
    report = evaluate(run, level="patient", out=out, quiet=True, plots=False, bootstrap=50)
    assert report.out_dir == out and (out / "metrics.csv").is_file()
    assert report.levels == ("patient",)
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 24 and (predictions["n_slides"] == 2).all()

    slides = pd.read_csv(run / "fold_0" / "predictions.csv")
    prob_columns = [f"prob_{c}" for c in CLASSES_3]
    means = slides.groupby("patient_id")[prob_columns].mean()
    labels = slides.groupby("patient_id")["label_index"].first()
    expected = balanced_accuracy_score(labels, means.to_numpy().argmax(axis=1))
    assert report.result(0).metrics.balanced_accuracy == pytest.approx(expected)
    assert report.result(0).metrics.n == 12


def test_patient_level_max_is_any_slide_positive(tmp_path):
    classes = ("benign", "malignant")
    run = write_run(tmp_path / "max", classes, folds=2)
    report = evaluate(run, quiet=True, plots=False, bootstrap=50, patient_aggregation="max")
    slides = pd.read_csv(run / "fold_0" / "predictions.csv")
    highest = slides.groupby("patient_id")["prob_malignant"].max()
    patients = report.result(0, "patient").frame.set_index("patient_id")
    assert np.allclose(patients.loc[highest.index, "prob_malignant"], highest)
    assert np.allclose(patients["prob_benign"], 1 - patients["prob_malignant"])
    three = write_run(tmp_path / "max3", CLASSES_3, folds=1)
    with pytest.raises(ArtifactError, match="'max' needs 2 classes"):
        evaluate(three, quiet=True, plots=False, patient_aggregation="max")


def test_single_slide_patients_are_reported_at_slide_level_only(tmp_path):
    run = write_run(tmp_path / "single", CLASSES_3, folds=2)
    for fold in range(2):
        path = run / f"fold_{fold}" / "predictions.csv"
        frame = pd.read_csv(path)
        frame["patient_id"] = frame["slide_id"]
        frame.to_csv(path, index=False)
    report = evaluate(run, quiet=True, plots=False, bootstrap=50)
    assert report.levels == ("slide",)


# --- operating point, calibration, external cohort ------------------------------------------------


def test_youden_threshold_is_chosen_on_validation_and_applied_to_test(tmp_path):
    classes = ("benign", "malignant")
    run = write_run(tmp_path / "youden", classes, folds=2, validation=True, slides_per_fold=60)
    report = evaluate(run, quiet=True, level="slide", operating_point="youden", bootstrap=50)
    for fold in range(2):
        val = pd.read_csv(run / f"fold_{fold}" / "val_predictions.csv")
        fpr, tpr, thresholds = roc_curve(val["label_index"], val["prob_malignant"])
        expected = thresholds[np.argmax(tpr - fpr)]
        result = report.result(fold)
        assert result.threshold == pytest.approx(expected)
        y, probs = fold_arrays(run, fold, classes)
        called = (probs[:, 1] >= expected).astype(int)
        assert (result.metrics.confusion == confusion_matrix(y, called, labels=[0, 1])).all()
        assert result.metrics.accuracy == pytest.approx(accuracy_score(y, called))
    thresholds = pd.read_csv(run / "report" / "thresholds.csv", dtype={"fold": str})
    assert thresholds["fold"].tolist() == ["0", "1"]
    assert (thresholds["operating_point"] == "youden").all()
    assert "Operating point (youden" in (run / "report" / "summary.md").read_text()


def test_a_target_sensitivity_is_reached_on_validation(tmp_path):
    classes = ("benign", "malignant")
    run = write_run(tmp_path / "sens", classes, folds=2, validation=True, slides_per_fold=80,
                    signal=1.0)  # fmt: skip
    report = evaluate(run, quiet=True, plots=False, level="slide", bootstrap=0,
                      operating_point="sensitivity", target_sensitivity=0.95)  # fmt: skip
    for fold in range(2):
        val = pd.read_csv(run / f"fold_{fold}" / "val_predictions.csv")
        positive = val["label_index"] == 1
        threshold = report.result(fold).threshold
        assert (val.loc[positive, "prob_malignant"] >= threshold).mean() >= 0.95
        assert threshold < 0.5  # a weak model must lower its threshold to reach 95%


def test_a_threshold_without_validation_predictions_is_an_error(tmp_path):
    run = write_run(tmp_path / "noval", ("a", "b"), folds=1)
    with pytest.raises(ArtifactError, match=r"val_predictions\.csv.*missing"):
        evaluate(run, quiet=True, operating_point="youden")


def test_temperature_scaling_is_fitted_on_validation_and_lowers_the_test_ece(tmp_path):
    run = write_run(tmp_path / "calibrate", CLASSES_3, folds=2, validation=True,
                    slides_per_fold=300, signal=1.0, sharpness=3.0)  # fmt: skip
    before = evaluate(run, quiet=True, plots=False, level="slide", bootstrap=0)
    report = evaluate(run, quiet=True, level="slide", calibrate="temperature", bootstrap=0)
    for fold in range(2):
        record = json.loads((run / f"fold_{fold}" / "calibration.json").read_text())
        assert record["fitted_on"] == "val_predictions.csv" and record["n_validation"] == 300
        assert record["temperature"] == pytest.approx(report.temperatures[fold])
        assert record["temperature"] > 2  # the logits were 3x too large
        assert record["validation_ece_after"] < record["validation_ece_before"]
        result = report.result(fold)
        assert result.before_calibration[0] == pytest.approx(before.result(fold).ece)
        assert result.ece < 0.6 * result.before_calibration[0]
        # the arg-max, hence accuracy, does not move
        assert result.metrics.accuracy == pytest.approx(before.result(fold).metrics.accuracy)
    calibration = pd.read_csv(run / "report" / "calibration.csv", dtype={"fold": str})
    assert calibration["fold"].tolist() == ["0", "1", "pooled"]
    assert (calibration["ece_after"] < calibration["ece_before"]).all()
    assert "Temperature scaling" in (run / "report" / "summary.md").read_text()
    _assert_real_png(run / "report" / "reliability.png")


def write_external(path, class_names, *, slides=40, seed=9, calibration=None):
    """A predictions.csv as `slidemil predict` writes it for a labelled cohort."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(slides) // 2) % len(class_names)  # patients of 2 slides, one label
    logits = rng.normal(size=(slides, len(class_names))) + 1.5 * np.eye(len(class_names))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "slide_id": [f"ext_{i:03d}" for i in range(slides)],
            "patient_id": [f"ext_p{i // 2:03d}" for i in range(slides)],
            "label": [class_names[i] for i in labels],
            **{f"prob_{c}": probs[:, i] for i, c in enumerate(class_names)},
            "predicted": [class_names[i] for i in probs.argmax(axis=1)],
            "n_patches": 100,
        }
    )
    if calibration is not None:
        frame["calibration"] = calibration
    path.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path / "predictions.csv", index=False)
    return frame


def test_an_external_cohort_is_evaluated_next_to_the_cross_validation(tmp_path, capsys):
    run = write_run(tmp_path / "exp", CLASSES_3, folds=2)
    external = write_external(tmp_path / "preds", CLASSES_3)
    # a slide without a label (an unlabelled row of the cohort) is left out
    frame = pd.read_csv(tmp_path / "preds" / "predictions.csv")
    frame.loc[len(frame)] = {**frame.iloc[0].to_dict(), "slide_id": "ext_x", "label": None}
    frame.to_csv(tmp_path / "preds" / "predictions.csv", index=False)

    report = evaluate(run, external=tmp_path / "preds", bootstrap=200, level="slide")
    result = report.result("all", "slide", cohort="external")
    y = (np.arange(40) // 2) % 3
    probs = external[[f"prob_{c}" for c in CLASSES_3]].to_numpy()
    assert result.metrics.n == 40
    assert result.metrics.macro_auc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    low, high = result.intervals.interval("macro_auc")
    assert low < result.metrics.macro_auc < high
    markdown = (run / "report" / "summary.md").read_text()
    assert "external (n=40, 95% CI)" in markdown and "pooled (n=48, 95% CI)" in markdown
    printed = capsys.readouterr().out
    assert "external" in printed and f"{result.metrics.macro_auc:.3f}" in printed
    for name in FIGURES:
        _assert_real_png(run / "report" / "external" / name)

    both = evaluate(run, external=tmp_path / "preds", bootstrap=50, plots=False, quiet=True)
    assert both.result("all", "patient", cohort="external").metrics.n == 20
    metrics = pd.read_csv(run / "report" / "metrics.csv", dtype={"fold": str})
    external_rows = metrics[metrics["cohort"] == "external"]
    assert external_rows["level"].tolist() == ["slide", "patient"]
    assert (external_rows["fold"] == "all").all()


def test_external_predictions_without_labels_are_refused(tmp_path):
    run = write_run(tmp_path / "exp", CLASSES_3, folds=1)
    write_external(tmp_path / "preds", CLASSES_3)
    path = tmp_path / "preds" / "predictions.csv"
    pd.read_csv(path).drop(columns="label").to_csv(path, index=False)
    with pytest.raises(ArtifactError, match="no label column") as error:
        evaluate(run, external=path, quiet=True)
    assert str(path) in str(error.value)
    write_external(tmp_path / "other", ("cat", "dog", "necrosis"))
    with pytest.raises(ArtifactError, match="prob_normal"):
        evaluate(run, external=tmp_path / "other", quiet=True)


def test_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ArtifactError, match=r"no run\.json") as error:
        evaluate(tmp_path, quiet=True)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_run_without_any_predictions(tmp_path):
    run = write_run(tmp_path / "early", CLASSES_3, folds=2, missing=(0, 1))
    with pytest.raises(ArtifactError, match=r"no fold has predictions\.csv"):
        evaluate(run, quiet=True)


def test_predictions_missing_a_class_column(tmp_path):
    run = write_run(tmp_path / "bad", CLASSES_3, folds=1)
    path = run / "fold_0" / "predictions.csv"
    pd.read_csv(path).drop(columns="prob_tumour").to_csv(path, index=False)
    with pytest.raises(ArtifactError, match="prob_tumour") as error:
        evaluate(run, quiet=True)
    assert "predictions.csv" in str(error.value)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate\.level"):
        evaluate(tmp_path, level="tile")
    with pytest.raises(ConfigError, match="unknown option 'levels'"):
        evaluate(tmp_path, levels="slide")
    assert EvaluateConfig().out is None  # default: <run>/report


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_evaluate(tmp_path):
    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app

    run = write_run(tmp_path / "cli", CLASSES_3, folds=2)
    config = tmp_path / "exp.yaml"
    config.write_text("evaluate:\n  level: patient\n")
    result = CliRunner().invoke(app, ["evaluate", str(run), "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "2 fold(s) evaluated" in result.output
    resolved = yaml.safe_load((run / "report" / "evaluate_config.yaml").read_text())
    assert resolved["evaluate"]["level"] == "patient" and resolved["evaluate"]["quiet"] is True

    binary = write_run(tmp_path / "binary", ("benign", "malignant"), folds=2, validation=True)
    write_external(tmp_path / "preds", ("benign", "malignant"))
    args = ["evaluate", str(binary), "--external", str(tmp_path / "preds"), "--calibrate",
            "temperature", "--operating-point", "sensitivity", "--target-sensitivity", "0.8",
            "--bootstrap", "100", "--confidence", "0.9", "--ece-bins", "5", "--level", "slide",
            "--no-plots", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "temperatures: fold_<k>/calibration.json (2 folds)" in result.output
    assert (binary / "fold_1" / "calibration.json").is_file()
    resolved = yaml.safe_load((binary / "report" / "evaluate_config.yaml").read_text())["evaluate"]
    assert resolved["operating_point"] == "sensitivity" and resolved["confidence"] == 0.9
    assert (
        "90% percentile bootstrap, 100 resamples" in (binary / "report" / "summary.md").read_text()
    )

    result = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2
    assert "no run.json" in result.output and str(tmp_path) in result.output


# --- a real run: evaluate fits the temperature, predict applies it, evaluate reads it back --------

TORCH_THREADS = 1  # see conftest._torch_threads


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-fold run trained on random bags (real feature files, real torch), and its work."""
    from random_bags import make_random_work
    from slidemil.training import train

    root = tmp_path_factory.mktemp("trained")
    work = make_random_work(root / "work", patients=16, slides_per_patient=2, dim=16, seed=1)
    train(
        work.root, root / "run", folds=2, epochs=6, hidden_dim=16, attention_dim=8, lr=1e-2,
        device="cpu", quiet=True, seed=0,
    )  # fmt: skip
    return work, root / "run"


@pytest.mark.slow
def test_predict_applies_the_temperature_that_evaluate_fitted(trained, tmp_path):
    from slidemil.evaluation import apply_temperature, load_temperature
    from slidemil.prediction import predict

    work, run = trained
    features = work.root / "features" / work.encoder
    with pytest.raises(ArtifactError, match="no calibration fitted"):
        predict(run, work.root / "cohort.csv", tmp_path / "p", features=features,
                calibrate="temperature", quiet=True)  # fmt: skip

    report = evaluate(run, calibrate="temperature", bootstrap=100, plots=False, quiet=True)
    temperature = load_temperature(run / "fold_0")
    assert temperature == pytest.approx(report.temperatures[0])

    options = dict(features=features, model="fold_0", quiet=True)
    raw = predict(run, work.root / "cohort.csv", tmp_path / "raw", **options).predictions
    calibrated = predict(run, work.root / "cohort.csv", tmp_path / "cal", calibrate="temperature",
                         **options).predictions  # fmt: skip
    columns = [f"prob_{c}" for c in work.class_names]
    expected = apply_temperature(raw[columns].to_numpy(), temperature)
    assert np.allclose(calibrated[columns].to_numpy(), expected, atol=1e-5)
    assert (raw["calibration"] == "none").all() and (
        calibrated["calibration"] == "temperature"
    ).all()
    # a rerun into the same folder may not mix calibrated and raw predictions
    with pytest.raises(ConfigError, match="calibration"):
        predict(run, work.root / "cohort.csv", tmp_path / "cal", **options)

    # the predictions of a labelled cohort are an external test set for evaluate
    external = evaluate(run, external=tmp_path / "cal", calibrate="temperature", bootstrap=100,
                        plots=False, quiet=True)  # fmt: skip
    result = external.result("all", "slide", cohort="external")
    assert result.metrics.n == 32
    assert result.ece == pytest.approx(
        expected_calibration_error(
            raw["label"].map({c: i for i, c in enumerate(work.class_names)}).to_numpy(),
            expected,
            10,
        ),
        abs=1e-4,
    )


# --- per-site metrics ----------------------------------------------------------------------------


def add_sites(run, folds, sites_of_fold):
    """Give each fold's prediction tables a ``site`` column after ``patient_id``, as training
    writes them for a cohort with sites: ``sites_of_fold(fold, patient number) -> site``."""
    for fold in range(folds):
        for name in ("predictions.csv", "val_predictions.csv"):
            path = run / f"fold_{fold}" / name
            if not path.is_file():
                continue
            frame = pd.read_csv(path)
            number = frame["patient_id"].str[-3:].astype(int)
            frame.insert(2, "site", [sites_of_fold(fold, n) for n in number])
            frame.to_csv(path, index=False)


def test_per_site_metrics_are_those_of_each_sites_pooled_predictions(tmp_path):
    classes = ("benign", "malignant")
    run = write_run(tmp_path / "run", classes, folds=3, validation=True, slides_per_fold=40)
    # site-held-out folds: fold 0 tests site A; folds 1 and 2 share sites B and C
    add_sites(run, 3, lambda fold, n: "A" if fold == 0 else "BC"[n // 2 % 2])
    report = evaluate(run, quiet=True, bootstrap=0, plots=False, operating_point="youden")
    table = pd.read_csv(run / "report" / "per_site.csv", dtype={"folds": str})
    assert table.columns[:6].tolist() == ["cohort", "level", "site", "n", "n_patients", "folds"]
    slide = table[table["level"] == "slide"].set_index("site")
    assert slide.index.tolist() == ["A", "B", "C"]
    assert slide.loc["A", "folds"] == "0" and slide.loc["B", "folds"] == "1;2"
    pooled = report.result("pooled").frame
    for site, row in slide.iterrows():
        rows = pooled[pooled["site"] == site]
        y, called = rows["label_index"], rows["predicted_index"]  # each fold's own threshold
        assert row["n"] == len(rows) and row["n_patients"] == rows["patient_id"].nunique()
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, called))
        assert row["macro_auc"] == pytest.approx(roc_auc_score(y, rows["prob_malignant"]))
    # the patient level keeps each patient's site
    patient = table[table["level"] == "patient"].set_index("site")
    assert patient["n"].sum() == report.result("pooled", "patient").metrics.n
    assert "## Per site" in (run / "report" / "summary.md").read_text()
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert {row["site"] for row in summary["per_site"]} == {"A", "B", "C"}
    assert "site" in pd.read_csv(run / "report" / "predictions.csv").columns


def test_a_site_without_a_class_warns_and_a_run_without_sites_has_no_table(tmp_path):
    run = write_run(tmp_path / "run", CLASSES_3, folds=2, slides_per_fold=24)
    plain = evaluate(run, quiet=True, bootstrap=0, plots=False)
    assert plain.per_site.empty and not (run / "report" / "per_site.csv").exists()
    # site Z holds only the first patient of each fold: one class at most
    add_sites(run, 2, lambda fold, n: "Z" if n == 0 else "Y")
    with pytest.warns(AbsentClassWarning, match="site Z"):
        report = evaluate(run, quiet=True, bootstrap=0, plots=False, level="slide")
    z = report.per_site.set_index("site").loc["Z"]
    assert math.isnan(z["macro_auc"]) and z["n"] == 4


def test_an_external_cohort_with_sites_gets_per_site_rows(tmp_path):
    run = write_run(tmp_path / "run", CLASSES_3, folds=2)
    external = tmp_path / "external"
    frame = write_external(external, CLASSES_3, slides=30)
    frame["site"] = ["X", "W"] * 15
    frame.to_csv(external / "predictions.csv", index=False)
    report = evaluate(run, quiet=True, bootstrap=0, plots=False, external=external, level="slide")
    rows = report.per_site[report.per_site["cohort"] == "external"]
    assert rows["site"].tolist() == ["W", "X"] and rows["n"].tolist() == [15, 15]
