"""``slidemil demo`` end to end on a tiny cohort: every stage's outputs, the summary, a rerun."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from slidemil.cli import app
from slidemil.cli import commands as _commands  # noqa: F401  (registers the commands)
from slidemil.demonstration import demo

TINY = dict(slides=16, classes=2, size=2048, folds=2, epochs=4, patch_size=64, workers=2)


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    result = demo(out, quiet=True, **TINY)

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"balanced_accuracy", "attention_lesion_auc", "seconds", "paths"}
    assert 0.0 <= result.balanced_accuracy[0] <= 1.0
    assert list(summary["seconds"]) == [
        "synth", "patch", "extract", "train", "evaluate", "predict", "heatmap",
    ]  # fmt: skip

    new_slides = pd.read_csv(out / "new_slides.csv", dtype=str)
    train_slides = pd.read_csv(out / "cohort_train.csv", dtype=str)
    assert len(new_slides) + len(train_slides) == 16
    assert set(new_slides["label"]) == set(train_slides["label"])  # one held-out patient each
    assert not set(new_slides["patient_id"]) & set(train_slides["patient_id"])

    predictions = pd.read_csv(out / "predictions" / "predictions.csv", dtype=str)
    assert sorted(predictions["slide_id"]) == sorted(new_slides["slide_id"])
    for slide_id in new_slides["slide_id"]:
        assert (out / "predictions" / "attention" / f"{slide_id}.h5").is_file()
        assert (out / "heatmaps" / f"{slide_id}.png").is_file()
    assert (out / "runs" / "demo" / "report" / "metrics.csv").is_file()
    assert len(list((out / "work" / "features" / "resnet18").glob("*.h5"))) == len(train_slides)

    # A rerun (through the CLI) finds everything done and recomputes nothing.
    features = {p: p.stat().st_mtime_ns for p in (out / "work" / "features").rglob("*.h5")}
    args = ["demo", "--out", str(out), "--quiet"]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "balanced accuracy over 2 folds" in rerun.output
    assert f"slidemil view {out / 'predictions'}" in rerun.output  # how to open the viewer
    assert features == {p: p.stat().st_mtime_ns for p in features}


def test_bad_options_are_refused_by_name(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--folds", "1"])
    assert result.exit_code == 2
    assert "folds" in result.output
