"""``slidemil export``: ONNX and TorchScript graphs that predict exactly like the run they come
from (every registered MIL model, bags of any size), their model card, ``slidemil predict`` from
an export folder, and the documented onnxruntime + numpy snippet."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from random_bags import make_random_work
from slidemil.cli.app import app
from slidemil.deployment import ExportedRun, export, run_graph
from slidemil.deployment.run import grid_patch_coords
from slidemil.errors import ArtifactError, ConfigError, MissingExtraError
from slidemil.models import list_models
from slidemil.models.registry import model_uses_coords
from slidemil.prediction import predict
from slidemil.prediction.ensemble import Ensemble
from slidemil.prediction.trained_run import TrainedRun
from slidemil.training import train
from test_prediction import write_toy_work

TORCH_THREADS = 1  # see conftest._torch_threads
DOCS = Path(__file__).resolve().parents[1] / "docs" / "export.md"
# Registered models that cannot be exported, with the reason (none today).
NOT_EXPORTABLE: dict[str, str] = {}
BAG_SIZES = (1, 300, 20_000)  # a single patch, a typical bag, a large slide
TOLERANCE = 1e-5  # max abs difference of probabilities and attention, float32


def _train(work_root: Path, out: Path, model: str) -> Path:
    train(
        work_root, out, model=model, folds=2, epochs=2, hidden_dim=16, attention_dim=8,
        device="cpu", quiet=True, seed=0,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def random_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_work")
    return make_random_work(root / "work", patients=12, classes=3, dim=16, seed=11)


@pytest.mark.parametrize("graph_format", ["onnx", "torchscript"])
@pytest.mark.parametrize("model", list_models())
def test_exported_graph_equals_the_runs_models_for_bags_of_any_size(
    random_work, tmp_path, model, graph_format
):
    if model in NOT_EXPORTABLE:
        pytest.skip(NOT_EXPORTABLE[model])
    run_dir = _train(random_work.root, tmp_path / "run", model)
    summary = export(run_dir, tmp_path / "model", format=graph_format)
    run = TrainedRun.open(run_dir)
    # the models `slidemil predict` runs for this run folder
    ensemble = Ensemble.load(
        run.checkpoints("mean"), run.class_names, run.feature_dim, torch.device("cpu")
    )
    rng = np.random.default_rng(0)
    # a model that lays its patches out by their coordinates (TransMIL) gets them in the graph
    uses_coords = model_uses_coords(ensemble.folds[0].model)
    assert ("coords" in summary.record["graph"]["input"]) == uses_coords
    for n in BAG_SIZES:
        # raw features far from standardised: the graph must standardise them per fold itself
        bag = rng.normal(2.0, 3.0, size=(n, run.feature_dim)).astype(np.float32)
        coords = grid_patch_coords(n, seed=n) if uses_coords else None
        expected = ensemble.infer(bag, coords)
        got = run_graph(summary.graph, graph_format, bag, coords)
        assert got["probabilities"].shape == (3,)
        assert got["attention"].shape == (n, 2)
        assert np.abs(got["probabilities"] - expected.mean_probabilities).max() < TOLERANCE
        assert np.abs(got["fold_probabilities"] - expected.probabilities).max() < TOLERANCE
        assert np.abs(got["attention"] - expected.attention).max() < TOLERANCE
        finite = np.isfinite(expected.scores)
        assert np.abs(got["scores"][finite] - expected.scores[finite]).max() < 1e-4
    # the two folds differ (own weights and standardisation), so averaging is really done
    assert np.abs(got["fold_probabilities"][0] - got["fold_probabilities"][1]).max() > 1e-6
    if uses_coords:  # the graph really uses the coords: other coords, other outputs
        moved = run_graph(summary.graph, graph_format, bag, grid_patch_coords(n, seed=n + 1))
        assert np.abs(moved["attention"] - got["attention"]).max() > 1e-6
        # `slidemil predict --model EXPORT` feeds the bag's coords, and refuses a bag without
        exported = ExportedRun.open(summary.out).ensemble(torch.device("cpu"))
        fed = exported.infer(bag, coords)
        assert np.abs(fed.probabilities - expected.probabilities).max() < TOLERANCE
        with pytest.raises(ArtifactError, match="has none"):
            exported.infer(bag)


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
    """A 2-fold run on bags with patch geometry, exported to ONNX: (work, run, export)."""
    root = tmp_path_factory.mktemp("toy_export")
    write_toy_work(root / "work")
    train(
        root / "work", root / "run", folds=2, epochs=4, hidden_dim=16, attention_dim=8,
        lr=1e-2, monitor="loss", device="cpu", quiet=True, seed=0,
    )  # fmt: skip
    export(root / "run", root / "model", format="onnx")
    return root / "work", root / "run", root / "model"


def _slides_csv(work: Path, out: Path) -> Path:
    cohort = pd.read_csv(work / "cohort.csv")
    cohort.to_csv(out, index=False)
    return out


def test_predict_from_an_export_equals_predict_from_the_run(toy_export, tmp_path):
    work, run_dir, model_dir = toy_export
    csv = _slides_csv(work, tmp_path / "slides.csv")
    features = work / "features" / "toy"
    from_run = predict(run_dir, csv, tmp_path / "p_run", features=features, quiet=True)
    from_export = predict(model_dir, csv, tmp_path / "p_export", features=features, quiet=True)
    a, b = from_run.predictions, from_export.predictions
    assert len(a) == len(b) == 16
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert np.abs(a[probs].to_numpy() - b[probs].to_numpy()).max() < TOLERANCE
    assert (a["predicted"] == b["predicted"]).all()
    import h5py

    with h5py.File(tmp_path / "p_run" / "attention" / "toy_03.h5") as f:
        run_attention = f["attention"][:]
    with h5py.File(tmp_path / "p_export" / "attention" / "toy_03.h5") as f:
        export_attention = f["attention"][:]
    assert np.abs(run_attention - export_attention).max() < TOLERANCE


def test_cli_predicts_from_an_export_given_as_model(toy_export, tmp_path):
    """`slidemil predict --model model/ new.csv`: the export stands where the run would."""
    from typer.testing import CliRunner

    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app

    work, run_dir, model_dir = toy_export
    csv = _slides_csv(work, tmp_path / "slides.csv")
    features = work / "features" / "toy"
    args = ["--features", str(features), "--quiet"]
    runner = CliRunner()
    result = runner.invoke(
        app, ["predict", "--model", str(model_dir), str(csv), "--out", str(tmp_path / "m"), *args]
    )
    assert result.exit_code == 0, result.output
    expected = predict(run_dir, csv, tmp_path / "r", features=features, quiet=True).predictions
    got = pd.read_csv(tmp_path / "m" / "predictions.csv")
    probs = [c for c in expected.columns if c.startswith("prob_")]
    assert np.abs(got[probs].to_numpy() - expected[probs].to_numpy()).max() < 1e-5
    alone = runner.invoke(app, ["predict", str(csv), "--out", str(tmp_path / "x"), *args])
    message = " ".join(alone.output.replace("│", " ").split())  # unwrap rich's error box
    assert alone.exit_code == 2 and "--model pointing at an export folder" in message


def test_model_json_and_card_describe_the_model(toy_export):
    _, run_dir, model_dir = toy_export
    record = json.loads((model_dir / "model.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    assert record["class_names"] == run["class_names"] == ["benign", "malignant"]
    assert record["folds"] == ["fold_0", "fold_1"]
    assert record["encoder"] == "toy" and record["feature_dim"] == 16
    assert record["training_cohort"]["slides"] == 16
    assert record["training_cohort"]["slides_per_class"] == {"benign": 8, "malignant": 8}
    folds = [json.loads((run_dir / f"fold_{k}" / "metrics.json").read_text()) for k in (0, 1)]
    accuracy = record["test_metrics"]["accuracy"]
    assert accuracy["mean"] == pytest.approx(np.mean([f["accuracy"] for f in folds]))
    assert accuracy["std"] == pytest.approx(np.std([f["accuracy"] for f in folds]))
    card = (model_dir / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Training data", "## Metrics", "## Limits"):
        assert section in card
    assert f"{accuracy['mean']:.3f}" in card


def test_one_fold_export_is_that_folds_model(toy_export, tmp_path):
    _, run_dir, _ = toy_export
    summary = export(run_dir, tmp_path / "fold1", format="torchscript", fold=1)
    assert summary.record["folds"] == ["fold_1"]
    run = TrainedRun.open(run_dir)
    ensemble = Ensemble.load(
        run.checkpoints("fold_1"), run.class_names, run.feature_dim, torch.device("cpu")
    )
    bag = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    got = run_graph(summary.graph, "torchscript", bag)
    assert np.abs(got["probabilities"] - ensemble.infer(bag).mean_probabilities).max() < TOLERANCE


def test_an_export_refuses_a_fold_choice_and_a_changed_graph(toy_export, tmp_path):
    work, run_dir, model_dir = toy_export
    csv = _slides_csv(work, tmp_path / "slides.csv")
    features = work / "features" / "toy"
    with pytest.raises(ConfigError, match="--fold"):
        predict(model_dir, csv, tmp_path / "p1", features=features, model="fold_0", quiet=True)
    copy = tmp_path / "copy"
    export(run_dir, copy, format="onnx", fold=0)
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"x")
    with pytest.raises(ArtifactError, match="sha256"):
        predict(copy, csv, tmp_path / "p2", features=features, quiet=True)
    assert ExportedRun.is_export(copy) and not ExportedRun.is_export(run_dir)


def test_a_calibrated_export_carries_each_folds_temperature(toy_export, tmp_path):
    from slidemil.evaluation import evaluate

    work, run_dir, _ = toy_export
    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    evaluate(run_copy, calibrate="temperature", quiet=True)
    summary = export(run_copy, tmp_path / "model", format="onnx", calibrate="temperature")
    assert summary.record["calibration"] == "temperature"
    run = TrainedRun.open(run_copy)
    checkpoints = run.checkpoints("mean")
    calibrated = Ensemble.load(
        checkpoints, run.class_names, run.feature_dim, torch.device("cpu"), calibrate=True
    )
    raw = Ensemble.load(checkpoints, run.class_names, run.feature_dim, torch.device("cpu"))
    bag = np.random.default_rng(3).normal(3.0, 2.0, size=(50, 16)).astype(np.float32)
    got = run_graph(summary.graph, "onnx", bag)["probabilities"]
    assert np.abs(got - calibrated.infer(bag).mean_probabilities).max() < TOLERANCE
    assert np.abs(got - raw.infer(bag).mean_probabilities).max() > 1e-4  # T really applied
    csv = _slides_csv(work, tmp_path / "slides.csv")
    features = work / "features" / "toy"
    with pytest.raises(ConfigError, match="--calibrate temperature"):
        predict(tmp_path / "model", csv, tmp_path / "p0", features=features, quiet=True)
    summary = predict(tmp_path / "model", csv, tmp_path / "p1", features=features,
                      calibrate="temperature", quiet=True)  # fmt: skip
    assert set(summary.predictions["calibration"]) == {"temperature"}


def test_the_docs_snippet_runs_the_onnx_file_with_onnxruntime_and_numpy(toy_export, tmp_path):
    _, run_dir, model_dir = toy_export
    text = DOCS.read_text(encoding="utf-8")
    snippet = re.search(r"<!-- snippet -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 25
    assert not re.search(r"^\s*(import|from)\s+(?!numpy|onnxruntime|json)", snippet, re.M)
    (tmp_path / "model").symlink_to(model_dir)
    bag = np.random.default_rng(2).normal(3.0, 2.0, size=(30, 16)).astype(np.float32)
    np.save(tmp_path / "bag.npy", bag)
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    run = TrainedRun.open(run_dir)
    ensemble = Ensemble.load(
        run.checkpoints("mean"), run.class_names, run.feature_dim, torch.device("cpu")
    )
    expected = ensemble.infer(bag).mean_probabilities
    printed = dict(re.findall(r"^(\w+): ([0-9.]+)$", result.stdout, re.M))
    assert set(printed) == set(run.class_names)
    for name, p in zip(run.class_names, expected, strict=True):
        assert float(printed[name]) == pytest.approx(p, abs=1e-4)
    assert "top patch:" in result.stdout


def test_cli_exports_and_names_the_missing_extra(toy_export, tmp_path, monkeypatch):
    _, run_dir, _ = toy_export
    runner = CliRunner()
    from slidemil.cli import commands  # noqa: F401  (registers the commands)

    result = runner.invoke(
        app, ["export", str(run_dir), "--out", str(tmp_path / "m"), "--format", "torchscript"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.pt").is_file() and (tmp_path / "m" / "MODEL_CARD.md").is_file()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    with pytest.raises(MissingExtraError, match=r"slidemil\[export\]"):
        export(run_dir, tmp_path / "m2", format="onnx")
    assert not (tmp_path / "m2" / "model.onnx").exists()
