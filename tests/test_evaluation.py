"""Evaluation: metrics equal scikit-learn's, report files, absent classes, missing folds, CLI."""

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
)
from typer.testing import CliRunner

from slidemil.errors import ArtifactError
from slidemil.evaluation import AbsentClassWarning, compute_metrics, evaluate
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
):
    """Write ``root`` as a training run with random but controlled predictions.

    Each patient has 2 slides of one label; ``absent`` maps a fold to a class index left out of
    its test part; folds in ``missing`` get a folder with a history but no predictions.
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
        labels = np.repeat([classes[i % len(classes)] for i in range(slides_per_fold // 2)], 2)
        logits = rng.normal(size=(len(labels), n_classes)) + signal * np.eye(n_classes)[labels]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        frame = pd.DataFrame(
            {
                "slide_id": [f"f{fold}_s{i:03d}" for i in range(len(labels))],
                "patient_id": [f"f{fold}_p{i // 2:03d}" for i in range(len(labels))],
                "label": [class_names[i] for i in labels],
                "label_index": labels,
                "fold": fold,
                **{f"prob_{c}": probs[:, i] for i, c in enumerate(class_names)},
                "predicted": [class_names[i] for i in probs.argmax(axis=1)],
            }
        )
        frame.to_csv(fold_dir / "predictions.csv", index=False)
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


def test_report_of_a_3_class_run(tmp_path, capsys):
    run = write_run(tmp_path / "exp1", CLASSES_3, folds=3)
    report = evaluate(run)
    out = run / "report"
    assert report.out_dir == out and report.folds == (0, 1, 2) and report.missing_folds == ()

    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["fold"].astype(str).tolist() == ["0", "1", "2", "mean", "std"]
    for fold in range(3):
        y, probs = fold_arrays(run, fold, CLASSES_3)
        row = metrics.iloc[fold]
        pred = probs.argmax(axis=1)
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert row["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert row["macro_auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    folds = metrics.iloc[:3]
    for column in ("accuracy", "macro_auc", "recall_tumour", "auc_necrosis"):
        assert metrics.iloc[3][column] == pytest.approx(folds[column].mean())
        assert metrics.iloc[4][column] == pytest.approx(folds[column].std(ddof=1))
    assert report.mean_std("accuracy") == pytest.approx(
        (folds["accuracy"].mean(), folds["accuracy"].std(ddof=1))
    )

    per_class = pd.read_csv(out / "per_class.csv")
    assert len(per_class) == 3 * 3 + 2 * 3  # folds x classes, then mean and std per class
    assert per_class[per_class["fold"] == "0"]["support"].sum() == 24

    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 72 and set(predictions["fold"]) == {0, 1, 2}
    assert {"slide_id", "patient_id", "label", "prob_necrosis", "predicted"} <= set(predictions)

    confusion = pd.read_csv(out / "confusion_matrices.csv")
    summed = confusion[confusion["fold"] == "sum"]["count"].to_numpy().reshape(3, 3)
    assert (summed == report.summed_confusion).all() and summed.sum() == 72

    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0, 1, 2] and summary["missing_folds"] == []
    assert "±" in (out / "summary.md").read_text()
    resolved = yaml.safe_load((out / "evaluate_config.yaml").read_text())
    assert resolved["evaluate"]["level"] == "slide"

    printed = capsys.readouterr().out
    assert "mean ± std" in printed and "balanced_accuracy" in printed


def _assert_real_png(path):
    assert path.is_file() and path.stat().st_size > 10_000
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # not a single colour


def test_plots_are_real_pngs(tmp_path):
    run = write_run(tmp_path / "exp", CLASSES_3, folds=2)
    evaluate(run, quiet=True)
    for name in ("confusion_matrix.png", "roc.png", "training_curves.png"):
        _assert_real_png(run / "report" / name)
    assert not list((run / "report").glob(".*tmp-*"))  # atomic writes left no temp file


def test_two_class_run(tmp_path):
    classes = ("benign", "malignant")
    run = write_run(tmp_path / "binary", classes, folds=2)
    report = evaluate(run, quiet=True, plots=False)
    for fold in range(2):
        y, probs = fold_arrays(run, fold, classes)
        assert report.metrics.iloc[fold]["macro_auc"] == pytest.approx(
            roc_auc_score(y, probs[:, 1])
        )


def test_eight_classes_with_a_class_absent_from_one_fold(tmp_path):
    run = write_run(tmp_path / "eight", CLASSES_8, folds=3, slides_per_fold=32, absent={1: 5})
    with pytest.warns(AbsentClassWarning, match="fold 1.*class_5"):
        report = evaluate(run, quiet=True)
    metrics = report.metrics.set_index("fold")
    assert math.isnan(metrics.at["1", "auc_class_5"])
    assert math.isnan(metrics.at["1", "recall_class_5"])
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
    report = evaluate(run, quiet=True, plots=False)
    assert report.folds == (0, 2) and report.missing_folds == (1,)
    metrics = pd.read_csv(run / "report" / "metrics.csv", dtype={"fold": str})
    assert metrics["fold"].tolist() == ["0", "2", "mean", "std"]
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["missing_folds"] == [1]


def test_patient_level_means_slide_probabilities(tmp_path):
    run = write_run(tmp_path / "patients", CLASSES_3, folds=2)
    out = tmp_path / "patient_report"
    report = evaluate(run, level="patient", out=out, quiet=True, plots=False)
    assert report.out_dir == out and (out / "metrics.csv").is_file()
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 24 and (predictions["n_slides"] == 2).all()

    slides = pd.read_csv(run / "fold_0" / "predictions.csv")
    prob_columns = [f"prob_{c}" for c in CLASSES_3]
    means = slides.groupby("patient_id")[prob_columns].mean()
    labels = slides.groupby("patient_id")["label_index"].first()
    expected = balanced_accuracy_score(labels, means.to_numpy().argmax(axis=1))
    assert report.metrics.iloc[0]["balanced_accuracy"] == pytest.approx(expected)
    assert report.metrics.iloc[0]["n"] == 12


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
    from slidemil.errors import ConfigError

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

    result = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2
    assert "no run.json" in result.output and str(tmp_path) in result.output
