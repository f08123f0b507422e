"""Training: the model learns a planted signal, splits never leak patients, a killed run resumes
to the same weights, torchrun (gloo, CPU) works, options are validated, outputs have their layout.

Every run uses real feature files written by ``tests/random_bags.py`` and real torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from launch import torchrun
from random_bags import make_random_work
from slidemil.config import STAGE_SECTIONS, build, write_resolved
from slidemil.errors import ConfigError
from slidemil.evaluation.metrics import AbsentClassWarning
from slidemil.training import (
    MissingBagsWarning,
    TrainConfig,
    load_checkpoint,
    load_model_from_checkpoint,
    train,
)
from slidemil.training.bags import read_bag

REPO = Path(__file__).resolve().parents[1]
FOLD_FILES = {
    "checkpoint_best.pt",
    "checkpoint_latest.pt",
    "history.csv",
    "metrics.json",
    "predictions.csv",
    "val_predictions.csv",
}
HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
    "val_macro_auc",
    "val_selected",
    "lr",
    "seconds",
]
# a small, fast model for the runs that check mechanics rather than learning
TINY = {"hidden_dim": 16, "attention_dim": 8, "quiet": True, "device": "cpu"}


TORCH_THREADS = 1  # see conftest._torch_threads


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One run on an imbalanced 3-class cohort (16/12/8 patients) with a planted signal, with
    the patch and extract records that run.json copies."""
    root = tmp_path_factory.mktemp("learned")
    work = make_random_work(root / "work", class_patients=(16, 12, 8), dim=24, seed=1)
    write_resolved(root / "work" / "patch_config.yaml", {"patch": {"mpp": 0.5, "patch_size": 256}})
    extract_record = {
        "extract": {"encoder": work.encoder, "dtype": "float16"},
        "identity": {"encoder": work.encoder, "weights_identity": "random:seed=0"},
    }
    write_resolved(
        root / "work" / "features" / work.encoder / "extract_config.yaml", extract_record
    )
    out = root / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run warns about nothing
        result = train(
            work.root, out, epochs=12, lr=1e-3, max_patches=24, patience=5,
            hidden_dim=32, attention_dim=16, quiet=True, device="cpu",
        )  # fmt: skip
    return work, out, result, extract_record


def test_the_model_learns_the_planted_signal_and_attends_to_it(learned):
    work, out, result, _ = learned
    metrics = result.folds[0]
    assert metrics == json.loads((out / "fold_0" / "metrics.json").read_text())
    assert metrics["n_test"] >= 9
    assert metrics["balanced_accuracy"] >= 0.8  # chance: 1/3

    model, state = load_model_from_checkpoint(out / "fold_0" / "checkpoint_best.pt")
    mean, std = (state["standardization"][k].numpy() for k in ("mean", "std"))
    hits = []
    for slide_id in state["split"]["test"]:
        bag = (read_bag(work.feature_path(slide_id)).astype(np.float32) - mean) / std
        with torch.no_grad():
            _, attention = model(torch.from_numpy(bag)[None], torch.ones(1, len(bag), dtype=bool))
        top = np.argsort(-attention[0].numpy())[: len(work.signal[slide_id])]
        hits.append(np.isin(top, work.signal[slide_id]).mean())
    assert np.mean(hits) >= 0.8  # the planted instances are ranked first


def test_class_weights_are_total_over_classes_times_count_of_the_training_part(learned):
    _, out, _, _ = learned
    splits = pd.read_csv(out / "splits.csv")
    counts = splits[splits["part"] == "train"]["label"].value_counts()
    state = load_checkpoint(out / "fold_0" / "checkpoint_best.pt")
    expected = [counts.sum() / (3 * counts[name]) for name in state["class_names"]]
    assert state["class_weights"] == pytest.approx(expected)
    assert len(set(np.round(expected, 6))) == 3  # the cohort is imbalanced


def test_no_patient_is_in_two_parts_and_the_split_is_70_15_15(learned):
    work, out, _, _ = learned
    splits = pd.read_csv(out / "splits.csv", dtype=str)
    assert list(splits.columns) == ["slide_id", "patient_id", "label", "fold", "part"]
    cohort = pd.read_csv(work.root / "cohort.csv", dtype=str)
    assert sorted(splits["slide_id"]) == sorted(cohort["slide_id"])
    assert splits.groupby("patient_id")["part"].nunique().max() == 1
    share = splits.drop_duplicates("patient_id")["part"].value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.08)
    state = load_checkpoint(out / "fold_0" / "checkpoint_latest.pt")
    for part, ids in state["split"].items():
        assert sorted(ids) == sorted(splits.loc[splits["part"] == part, "slide_id"])


def test_run_outputs_have_their_documented_layout(learned):
    work, out, result, extract_record = learned
    assert {p.name for p in out.iterdir()} == {"config.yaml", "run.json", "splits.csv", "fold_0"}
    assert {p.name for p in (out / "fold_0").iterdir()} == FOLD_FILES
    run = json.loads((out / "run.json").read_text())
    assert run["class_names"] == ["class_0", "class_1", "class_2"]
    assert run["folds"] == 1 and run["feature_dim"] == 24 and run["encoder"] == work.encoder
    assert run["patch_config"] == {"mpp": 0.5, "patch_size": 256}
    assert run["extract_config"] == extract_record
    # the resolved config is itself a valid --config file
    resolved = build(TrainConfig, section="train", config_file=out / "config.yaml")
    assert resolved.epochs == 12 and resolved.lr == 1e-3 and resolved.max_patches == 24

    history = pd.read_csv(out / "fold_0" / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS
    metrics = result.folds[0]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "recall_class_2"} <= set(
        metrics
    )
    # the best epoch has the best smoothed balanced accuracy (val_selected: the trailing mean of
    # 5 epochs), ties going to the lower validation loss; with 12 epochs < min_epochs (30), every
    # epoch may be best and none stops early
    smoothed = history["val_balanced_accuracy"].rolling(5, min_periods=1).mean()
    np.testing.assert_allclose(history["val_selected"], smoothed)
    best = history.sort_values(["val_selected", "val_loss"], ascending=[False, True])
    assert metrics["best_epoch"] == best["epoch"].iloc[0]
    assert len(history) == 12

    predictions = pd.read_csv(out / "fold_0" / "predictions.csv")
    assert len(predictions) == metrics["n_test"]
    assert predictions[[f"prob_class_{k}" for k in range(3)]].sum(axis=1).to_numpy() == (
        pytest.approx(1.0, abs=1e-5)
    )


def test_evaluation_reads_the_run(learned):
    from slidemil.evaluation import evaluate

    _, out, result, _ = learned
    report = evaluate(out, out=out.parent / "report", quiet=True)
    mean, _ = report.mean_std("balanced_accuracy")
    assert mean == pytest.approx(result.folds[0]["balanced_accuracy"])
    assert (out.parent / "report" / "training_curves.png").is_file()


@pytest.mark.parametrize(
    ("schedule", "switch_cache", "sampling"),
    [
        ("warmup-cosine", False, {}),
        ("plateau", True, {}),
        # balanced sampling in batches, with early-stopping state that spans the interruption
        ("cosine", False, {"sampler": "balanced", "batch_size": 2, "smoothing": 3}),
    ],
)
def test_a_stopped_run_resumes_to_the_same_weights_as_an_uninterrupted_one(
    tmp_path, schedule, switch_cache, sampling
):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=2)
    options = dict(
        TINY, epochs=5, lr=3e-3, max_patches=12, dropout=0.25, schedule=schedule,
        warmup_epochs=2, patience=0, min_epochs=0, **sampling,
    )  # fmt: skip
    whole = train(work.root, tmp_path / "whole", **options)

    stopped = tmp_path / "stopped"
    # runtime options may change between invocations without changing the result
    runtime = {"workers": 1} if switch_cache else {}
    first = train(work.root, stopped, epoch_budget=2, cache=not switch_cache, **runtime, **options)
    assert first.folds == {0: None} and not (stopped / "fold_0" / "metrics.json").exists()
    assert len(pd.read_csv(stopped / "fold_0" / "history.csv")) == 2
    # a save killed half-way leaves a temp file, which resuming ignores
    (stopped / "fold_0" / ".checkpoint_latest.tmp-deadbeef.pt").write_bytes(b"partial")
    train(work.root, stopped, epoch_budget=1, cache=switch_cache, **runtime, **options)
    resumed = train(work.root, stopped, cache=not switch_cache, **runtime, **options)

    assert resumed.folds[0] == whole.folds[0]
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt"):
        a = load_checkpoint(tmp_path / "whole" / "fold_0" / name)
        b = load_checkpoint(stopped / "fold_0" / name)
        assert a["epoch"] == b["epoch"]
        assert a["model_state"].keys() == b["model_state"].keys()
        for key, tensor in a["model_state"].items():
            assert torch.equal(tensor, b["model_state"][key]), key
        assert a["scheduler_state"] == b["scheduler_state"]
        moments = [s["exp_avg"] for s in a["optimizer_state"]["state"].values()]
        moments_b = [s["exp_avg"] for s in b["optimizer_state"]["state"].values()]
        assert all(torch.equal(x, y) for x, y in zip(moments, moments_b, strict=True))
    history_a = pd.read_csv(tmp_path / "whole" / "fold_0" / "history.csv").drop(columns="seconds")
    history_b = pd.read_csv(stopped / "fold_0" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history_a, history_b, check_exact=True)
    for name in ("predictions.csv", "val_predictions.csv"):
        assert (tmp_path / "whole" / "fold_0" / name).read_text() == (
            stopped / "fold_0" / name
        ).read_text()
    if schedule == "warmup-cosine":
        lr = history_a["lr"].to_numpy()
        assert lr[0] < lr[1] < lr[2] and lr[2] > lr[3] > lr[4]


def test_a_run_folder_refuses_other_options_and_a_checkpoint_other_splits(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=3)
    train(work.root, tmp_path / "run", epochs=3, epoch_budget=1, **TINY)
    with pytest.raises(ConfigError, match=r"lr \(0.0002 -> 0.001\)"):
        train(work.root, tmp_path / "run", epochs=3, lr=1e-3, **TINY)
    # runtime options may change
    train(work.root, tmp_path / "run", epochs=3, epoch_budget=1, cache=False, workers=1, **TINY)
    # another cohort gives other splits: refused
    (work.feature_path("p000_s0")).unlink()
    with (
        pytest.warns(MissingBagsWarning),
        pytest.raises(ConfigError, match="splits differ"),
    ):
        train(work.root, tmp_path / "run", epochs=3, **TINY)


def test_k_fold_trains_only_the_fold_asked_for_then_the_others(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=4)
    out = tmp_path / "cv"
    result = train(work.root, out, folds=3, fold=1, epochs=2, **TINY)
    assert list(result.folds) == [1] and result.folds[1] is not None
    assert {p.name for p in out.iterdir()} == {"config.yaml", "run.json", "splits.csv", "fold_1"}
    assert {p.name for p in (out / "fold_1").iterdir()} == FOLD_FILES
    splits = pd.read_csv(out / "splits.csv", dtype={"fold": int})
    assert sorted(splits["fold"].unique()) == [0, 1, 2]
    assert json.loads((out / "run.json").read_text())["folds"] == 3
    assert splits.groupby(["fold", "patient_id"])["part"].nunique().max() == 1
    tested = splits[splits["part"] == "test"]
    assert tested["slide_id"].is_unique and len(tested) == 24  # each slide tested once
    for _, fold in splits.groupby("fold"):
        assert set(fold["part"]) == {"train", "val", "test"}
    fold_1 = (out / "fold_1" / "checkpoint_best.pt").stat().st_mtime_ns

    result = train(work.root, out, folds=3, epochs=2, **TINY)
    assert sorted(result.folds) == [0, 1, 2] and result.finished
    assert (out / "fold_1" / "checkpoint_best.pt").stat().st_mtime_ns == fold_1  # skipped
    for k in range(3):
        assert {p.name for p in (out / f"fold_{k}").iterdir()} == FOLD_FILES
        metrics = json.loads((out / f"fold_{k}" / "metrics.json").read_text())
        assert metrics["n_test"] == (splits[(splits["fold"] == k)]["part"] == "test").sum()

    with pytest.raises(ConfigError, match="fold 3 does not exist"):
        train(work.root, out, folds=3, fold=3, epochs=2, **TINY)


def test_an_epoch_budget_spans_the_folds_of_one_invocation(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=4)
    result = train(work.root, tmp_path / "cv", folds=3, epochs=2, epoch_budget=3, **TINY)
    assert result.folds[0] is not None and result.folds[1] is None and result.folds[2] is None
    assert not result.finished
    assert len(pd.read_csv(tmp_path / "cv" / "fold_1" / "history.csv")) == 1
    assert not (tmp_path / "cv" / "fold_2").exists()


def test_unknown_options_are_refused_by_name(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=5)
    with pytest.raises(ConfigError, match="unknown option 'lerning_rate' in train"):
        train(work.root, tmp_path / "run", lerning_rate=0.1)
    config = tmp_path / "exp.yaml"
    config.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="lerning_rate") as caught:
        train(work.root, tmp_path / "run", config_file=config)
    assert str(config) in str(caught.value)
    config.write_text("training:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"unknown section.*training"):
        train(work.root, tmp_path / "run", config_file=config)
    with pytest.raises(ConfigError, match="monitor"):
        train(work.root, tmp_path / "run", monitor="auroc")
    assert not (tmp_path / "run").exists()


def test_missing_and_empty_feature_files_are_left_out_with_a_warning(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=6)
    work.feature_path("p000_s0").unlink()
    with h5py.File(work.feature_path("p001_s1"), "r+") as f:
        del f["features"]
        f.create_dataset("features", data=np.zeros((0, 16), np.float16))
    with pytest.warns(MissingBagsWarning, match=r"2 slide\(s\).*p000_s0 \(feature file missing"):
        result = train(work.root, tmp_path / "run", epochs=1, **TINY)
    assert set(result.excluded) == {"p000_s0", "p001_s1"}
    assert "empty bag" in result.excluded["p001_s1"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["excluded_slides"] == result.excluded
    assert run["patch_config"] is None and run["extract_config"] is None
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    assert len(splits) == 22 and not set(result.excluded) & set(splits["slide_id"])


def test_a_class_absent_from_validation_warns_once_not_every_epoch(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=7)
    cohort = pd.read_csv(work.root / "cohort.csv")
    patient = cohort["patient_id"].str[-3:].astype(int)
    cohort["split"] = np.where(patient < 8, "train", np.where(patient % 2 == 0, "val", "test"))
    cohort.to_csv(work.root / "cohort.csv", index=False)  # val: class_0 patients only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(work.root, tmp_path / "run", epochs=4, monitor="loss", **TINY)
    absent = [str(w.message) for w in caught if issubclass(w.category, AbsentClassWarning)]
    # once for the validation part, once for the test part (which lacks class_0); none per epoch
    assert len(absent) == 2
    assert "no val slide of class(es) class_1" in absent[0]
    assert "test part" in absent[1] and "class(es) class_0" in absent[1]
    history = pd.read_csv(tmp_path / "run" / "fold_0" / "history.csv")
    assert len(history) == 4 and history["val_macro_auc"].isna().all()


@pytest.mark.slow
def test_two_process_torchrun_on_cpu_matches_a_single_process_run(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=8)
    args = ["train", str(work.root), "--epochs", "2", "--hidden-dim", "16", "--attention-dim", "8"]
    args += ["--device", "cpu", "--quiet"]
    train(work.root, tmp_path / "single", epochs=2, **TINY)
    done = torchrun("-m", "slidemil", *args, "--out", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("1 fold(s) trained") == 1  # rank 0 only

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert (single / "splits.csv").read_text() == (ddp / "splits.csv").read_text()
    assert {p.name for p in (ddp / "fold_0").iterdir()} == FOLD_FILES
    metrics = json.loads((ddp / "fold_0" / "metrics.json").read_text())
    assert metrics.keys() == json.loads((single / "fold_0" / "metrics.json").read_text()).keys()
    history = pd.read_csv(ddp / "fold_0" / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS and len(history) == 2
    # every test and validation slide predicted exactly once, though each rank had a share
    for name, part in (("predictions.csv", "test"), ("val_predictions.csv", "val")):
        predicted = pd.read_csv(ddp / "fold_0" / name)["slide_id"]
        splits = pd.read_csv(ddp / "splits.csv")
        assert sorted(predicted) == sorted(splits.loc[splits["part"] == part, "slide_id"])


def test_the_command_line_takes_a_config_file_and_flags_win(tmp_path):
    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app

    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=9)
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump(
            {"train": {"epochs": 5, "hidden_dim": 8, "attention_dim": 4, "max_patches": 0}}
        )
    )
    out = tmp_path / "run"
    args = ["train", str(work.root), "--out", str(out), "--config", str(config), "--quiet"]
    result = CliRunner().invoke(app, [*args, "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"1 fold(s) trained -> {out}" in result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert resolved["epochs"] == 2 and resolved["hidden_dim"] == 8
    assert resolved["max_patches"] is None  # 0 in the file: every instance
    assert len(pd.read_csv(out / "fold_0" / "history.csv")) == 2

    config.write_text("train:\n  hiden_dim: 8\n")
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == 2 and "unknown option 'hiden_dim' in train" in result.output


def test_the_example_experiment_config_loads_for_every_stage():
    from slidemil.evaluation.config import EvaluateConfig
    from slidemil.extraction.config import ExtractConfig
    from slidemil.heatmaps.config import HeatmapConfig
    from slidemil.patching.run import PatchConfig
    from slidemil.prediction.config import PredictConfig

    example = REPO / "examples" / "experiment.yaml"
    sections = yaml.safe_load(example.read_text())
    configs = {
        "patch": PatchConfig,
        "extract": ExtractConfig,
        "train": TrainConfig,
        "evaluate": EvaluateConfig,
        "predict": PredictConfig,
        "heatmap": HeatmapConfig,
    }
    assert set(sections) == set(configs) <= set(STAGE_SECTIONS)
    for section, model in configs.items():
        loaded = build(model, section=section, config_file=example)
        assert loaded.model_dump(mode="json") | sections[section] == loaded.model_dump(mode="json")
    assert build(TrainConfig, section="train", config_file=example).folds == 5


def test_early_stopping_waits_for_min_epochs_and_picks_the_best_from_then_on():
    from slidemil.training.loop import EarlyStopping

    # a lucky epoch 1 on a tiny validation part, then real learning from epoch 4 on
    values = [0.3, 0.9, 0.3, 0.3, 0.5, 0.6, 0.7, 0.7, 0.6, 0.6, 0.6]
    stopper = EarlyStopping(True, patience=2, min_epochs=4)
    trained = []
    for epoch, value in enumerate(values):
        if stopper.should_stop:
            break
        stopper.update(value, epoch, loss=1.0)
        trained.append(epoch)
    assert stopper.best_epoch == 6  # not the lucky epoch 1, though it scored higher
    assert trained[-1] == 8  # patience counted from the best epoch, never before min_epochs

    plain = EarlyStopping(True, patience=2)
    for epoch, value in enumerate(values):
        if plain.should_stop:
            break
        plain.update(value, epoch, loss=1.0)
    assert plain.best_epoch == 1 and plain.should_stop  # what min_epochs prevents

    # a run that ends before min_epochs still has its best epoch
    short = EarlyStopping(True, patience=2, min_epochs=20)
    for epoch, value in enumerate(values[:4]):
        short.update(value, epoch)
    assert short.best_epoch == 1 and not short.should_stop


def test_smoothing_prefers_a_plateau_to_a_single_lucky_epoch():
    from slidemil.training.loop import EarlyStopping

    values = [0.2, 0.9, 0.2, 0.6, 0.7, 0.7, 0.7, float("nan"), 0.7]
    raw = EarlyStopping(True, patience=None)
    smooth = EarlyStopping(True, patience=None, smoothing=3)
    compared = []
    for epoch, value in enumerate(values):
        raw.update(value, epoch)
        compared.append(smooth.smoothed(value))
        smooth.update(value, epoch)
    assert raw.best_epoch == 1
    assert smooth.best_epoch == 6  # mean of 0.7, 0.7, 0.7 beats 0.2, 0.9, 0.2 (0.433)
    assert compared[2] == pytest.approx(13 / 30) and compared[7] == pytest.approx(
        0.7
    )  # NaN left out


def test_min_epochs_holds_off_early_stopping_in_a_run(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=10)
    result = train(
        work.root, tmp_path / "run", epochs=8, patience=1, min_epochs=5, smoothing=1,
        monitor="loss", **TINY,
    )  # fmt: skip
    history = pd.read_csv(tmp_path / "run" / "fold_0" / "history.csv")
    best = result.folds[0]["best_epoch"]
    assert best >= 5  # chosen from min_epochs on, though epochs 0-4 count as validated too
    assert len(history) == 8 or len(history) == best + 2  # stops patience (1) after the best
    assert history.loc[history["epoch"] >= 5, "val_loss"].min() == pytest.approx(
        history.loc[history["epoch"] == best, "val_loss"].iloc[0]
    )


def test_the_standardizer_is_fitted_streaming_and_matches_the_concatenation(tmp_path):
    import tracemalloc

    from slidemil.formats.feature_file import write_feature_file
    from slidemil.training.bags import fit_standardizer

    rng = np.random.default_rng(0)
    # a large mean against a small spread, float32 and float16 bags, one constant feature
    bags = [(3000 + 0.05 * rng.normal(size=(n, 8))).astype(np.float32) for n in (5, 1200, 3, 777)]
    bags.append(rng.normal(size=(400, 8)).astype(np.float16) + np.float16(3000))
    for bag in bags:
        bag[:, 7] = 5.0
    reference = np.concatenate([b.astype(np.float64) for b in bags])
    fitted = fit_standardizer(bags)
    np.testing.assert_allclose(fitted.mean, reference.mean(0), rtol=1e-7)
    np.testing.assert_allclose(fitted.std[:7], reference.std(0)[:7], rtol=1e-5)
    assert fitted.std[7] == 1.0  # constant: centred only
    assert fitted.mean.dtype == fitted.std.dtype == np.float32

    # from files: a chunk at a time, never a float64 (or float32) copy of a whole bag
    path = tmp_path / "big.h5"
    big = rng.normal(2.0, 3.0, size=(200_000, 64)).astype(np.float32)  # 51 MiB
    write_feature_file(path, big, np.zeros((len(big), 2), np.int64), {"slide_id": "big"})
    expected = big.astype(np.float64)
    mean, std = expected.mean(0), expected.std(0)
    del expected
    tracemalloc.start()
    from_file = fit_standardizer([path])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(from_file.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(from_file.std, std, rtol=1e-6)
    assert peak < 16 * 2**20  # MiB: the bag alone is 51 in float32, 102 in float64

    tracemalloc.start()
    fit_standardizer([big])  # a cached bag: chunked as well
    assert tracemalloc.get_traced_memory()[1] < 16 * 2**20
    tracemalloc.stop()

    # features stored as one batch (1, N, D), as read_bag accepts them
    batched = tmp_path / "batched.h5"
    with h5py.File(batched, "w") as f:
        f.create_dataset("features", data=bags[1][None])
    np.testing.assert_array_equal(
        fit_standardizer([batched]).mean, fit_standardizer([bags[1]]).mean
    )


def test_a_run_refuses_to_resume_under_another_number_of_processes(tmp_path):
    from slidemil.training.checkpoint import save_checkpoint

    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=11)
    train(work.root, tmp_path / "run", epochs=3, epoch_budget=1, **TINY)
    latest = tmp_path / "run" / "fold_0" / "checkpoint_latest.pt"
    state = load_checkpoint(latest)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as a two-process torchrun job leaves it
    save_checkpoint(latest, state)
    with pytest.raises(ConfigError, match=r"interrupted run used 2 process\(es\), this one 1"):
        train(work.root, tmp_path / "run", epochs=3, **TINY)


@pytest.mark.slow
def test_a_torchrun_job_resumed_by_one_process_is_refused(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=12)
    out = tmp_path / "ddp"
    args = ["train", str(work.root), "--epochs", "3", "--hidden-dim", "16", "--attention-dim", "8"]
    args += ["--device", "cpu", "--quiet", "--epoch-budget", "1", "--out", str(out)]
    done = torchrun("-m", "slidemil", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out / "fold_0" / "checkpoint_latest.pt")["world_size"] == 2
    with pytest.raises(ConfigError, match=r"used 2 process\(es\), this one 1.*nproc_per_node"):
        train(work.root, out, epochs=3, **TINY)
    assert len(pd.read_csv(out / "fold_0" / "history.csv")) == 1  # nothing was trained


class _AuxiliaryABMIL(torch.nn.Module):
    """A label-aware test model: ABMIL plus an instance classifier on each bag's most attended
    instance, whose cross-entropy against the bag label (× ``weight``) is its auxiliary loss."""

    uses_labels = True

    def __init__(self, in_dim, n_classes, hidden_dim=16, attention_dim=8, weight=1.0):
        super().__init__()
        from slidemil.models.abmil import ABMIL

        self.mil = ABMIL(in_dim, n_classes, hidden_dim, attention_dim, dropout=0.0, gated=False)
        self.instance_head = torch.nn.Linear(hidden_dim, n_classes)
        self.weight = weight
        self.labels_seen: list[torch.Tensor] = []

    def forward(self, features, mask, return_scores=False, labels=None):
        outputs = self.mil(features, mask, return_scores)
        if labels is None:
            return outputs
        self.labels_seen.append(labels.clone())
        instances = self.mil.project(features)  # (B, N, H)
        top = outputs[1].argmax(dim=1)  # the most attended instance of each bag
        chosen = instances[torch.arange(len(top)), top]
        loss = torch.nn.functional.cross_entropy(self.instance_head(chosen), labels)
        return outputs[0], outputs[1], self.weight * loss


@pytest.fixture
def auxiliary_model(monkeypatch):
    """``test-auxiliary`` in the model registry for one test; the built models, in order."""
    from slidemil.models import registry

    built: list[_AuxiliaryABMIL] = []

    def builder(in_dim, n_classes, hidden_dim=16, attention_dim=8, weight=1.0):
        built.append(_AuxiliaryABMIL(in_dim, n_classes, hidden_dim, attention_dim, weight))
        return built[-1]

    entry = registry.ModelEntry("test-auxiliary", builder, "test: ABMIL + instance loss")
    monkeypatch.setitem(registry._MODELS, "test-auxiliary", entry)
    return built


def test_a_label_aware_models_auxiliary_loss_is_added_to_the_bag_loss(tmp_path, auxiliary_model):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=13)
    # no gradient clipping: its norm over one more (zero) gradient could differ by rounding
    options = dict(TINY, model="test-auxiliary", epochs=3, lr=3e-3, dropout=0.0, grad_clip=0)
    train(work.root, tmp_path / "with", **options, model_options={"weight": "1"})
    without = train(work.root, tmp_path / "without", **options, model_options={"weight": 0})
    with_loss, _ = auxiliary_model
    # the training forward got each batch's labels; validation and test calls got none
    splits = pd.read_csv(tmp_path / "with" / "splits.csv")
    trained = splits.loc[splits["part"] == "train", "label"].str[-1].astype(int)
    seen = torch.cat(with_loss.labels_seen)
    assert sorted(seen.tolist()) == sorted(trained.tolist() * 3)

    def latest(run):
        return load_checkpoint(run / "fold_0" / "checkpoint_latest.pt")

    a, b = latest(tmp_path / "with"), latest(tmp_path / "without")
    assert a["model_kwargs"]["weight"] == 1.0 and b["model_kwargs"]["weight"] == 0.0
    # the auxiliary loss trained the bag model too, through the shared projection
    assert not torch.equal(
        a["model_state"]["mil.project.0.weight"], b["model_state"]["mil.project.0.weight"]
    )
    history = pd.read_csv(tmp_path / "with" / "fold_0" / "history.csv")
    assert (history["train_auxiliary_loss"] > 0).all()
    history = pd.read_csv(tmp_path / "without" / "fold_0" / "history.csv")
    assert (history["train_auxiliary_loss"] == 0).all()
    # with weight 0 the model trains exactly as plain ABMIL: the hook adds the auxiliary loss
    # and nothing else, and the validation loss (which picks the best epoch) is the bag loss
    plain = train(work.root, tmp_path / "plain", **{**options, "model": "abmil"})
    plain_state = latest(tmp_path / "plain")["model_state"]
    for key, tensor in plain_state.items():
        assert torch.equal(tensor, b["model_state"][f"mil.{key}"]), key
    assert plain.folds[0] == without.folds[0]
    plain_history = pd.read_csv(tmp_path / "plain" / "fold_0" / "history.csv")
    assert "train_auxiliary_loss" not in plain_history
    pd.testing.assert_series_equal(plain_history["val_loss"], history["val_loss"])


def test_model_options_are_validated_coerced_recorded_and_compared_on_resume(
    tmp_path, auxiliary_model
):
    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app

    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=14)
    with pytest.raises(ConfigError, match=r"'abmil' has no option\(s\) k .*hidden_dim \(default"):
        train(work.root, tmp_path / "bad", model="abmil", model_options={"k": 8}, **TINY)
    with pytest.raises(ConfigError, match=r"weight='heavy': expected a number"):
        train(
            work.root, tmp_path / "bad", model="test-auxiliary", model_options={"weight": "heavy"}
        )
    with pytest.raises(ConfigError, match=r"train.hidden_dim: Input should be a valid integer"):
        train(work.root, tmp_path / "bad", model_options={"hidden_dim": "big"}, quiet=True)
    with pytest.raises(ConfigError, match="hidden_dim is given twice"):
        train(work.root, tmp_path / "bad", hidden_dim=32, model_options={"hidden_dim": 16})
    assert not (tmp_path / "bad").exists()

    # the command line: --model-option adds to the config file's model_options
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"train": {"epochs": 3, "model_options": {"dropout": 0.5}}}))
    out = tmp_path / "run"
    args = ["train", str(work.root), "--out", str(out), "--config", str(config), "--quiet"]
    args += ["--device", "cpu", "--epoch-budget", "1", "--attention-dim", "8"]
    result = CliRunner().invoke(app, [*args, "--model-option", "hidden_dim=16"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (resolved["hidden_dim"], resolved["dropout"], resolved["model_options"]) == (16, 0.5, {})
    state = load_checkpoint(out / "fold_0" / "checkpoint_latest.pt")
    assert state["model_kwargs"] == {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.5}
    model, _ = load_model_from_checkpoint(out / "fold_0" / "checkpoint_latest.pt")
    assert model.project[0].out_features == 16 and model.project[2].p == 0.5
    result = CliRunner().invoke(app, [*args, "--model-option", "hidden_dim"])
    assert result.exit_code == 2 and "'hidden_dim' is not KEY=VALUE" in result.output
    # a changed model option refuses to resume
    result = CliRunner().invoke(app, [*args, "--model-option", "hidden_dim=24"])
    assert result.exit_code != 0 and "hidden_dim (16 -> 24)" in result.output


# --- sites, augmented views and feature-space augmentation ---------------------------------------


def _sited_work(root: Path, *, views: int = 2):
    """12 patients × 2 slides in sites A, B, C (patients nested in sites), every feature file
    with ``views`` augmented views."""
    from feature_views import add_views

    work = make_random_work(root, patients=12, dim=16, seed=11)
    cohort = pd.read_csv(work.root / "cohort.csv")
    cohort["site"] = ["ABC"[int(p[-3:]) // 2 % 3] for p in cohort["patient_id"]]
    cohort.to_csv(work.root / "cohort.csv", index=False)
    for slide_id in cohort["slide_id"]:
        add_views(work.feature_path(slide_id), views)
    return work, cohort


def test_site_holdout_with_views_resumes_exactly_and_reports_per_site(tmp_path):
    from slidemil.evaluation import evaluate

    work, cohort = _sited_work(tmp_path / "work")
    options = dict(
        TINY, folds=3, site_holdout=True, views="random", instance_dropout=0.25,
        feature_noise=0.2, epochs=3, max_patches=16, lr=3e-3, patience=0, min_epochs=0,
    )  # fmt: skip
    whole = train(work.root, tmp_path / "whole", **options)
    splits = pd.read_csv(tmp_path / "whole" / "splits.csv", keep_default_na=False)
    assert list(splits.columns) == ["slide_id", "patient_id", "site", "label", "fold", "part"]
    for fold, table in splits.groupby("fold"):
        tested = set(table.loc[table["part"] == "test", "site"])
        fitted = set(table.loc[table["part"] != "test", "site"])
        assert len(tested) == 1 and not tested & fitted, fold
        predictions = pd.read_csv(tmp_path / "whole" / f"fold_{fold}" / "predictions.csv")
        assert set(predictions["site"]) == tested
        assert predictions.columns[:3].tolist() == ["slide_id", "patient_id", "site"]

    # views from RAM (cache) and from the files (no cache) give the same draws, and a run
    # stopped and resumed ends where an uninterrupted one does
    stopped = tmp_path / "stopped"
    train(work.root, stopped, epoch_budget=4, cache=False, **options)
    resumed = train(work.root, stopped, cache=True, **options)
    assert resumed.folds == whole.folds
    for fold in range(3):
        a = load_checkpoint(tmp_path / "whole" / f"fold_{fold}" / "checkpoint_latest.pt")
        b = load_checkpoint(stopped / f"fold_{fold}" / "checkpoint_latest.pt")
        for key, tensor in a["model_state"].items():
            assert torch.equal(tensor, b["model_state"][key]), (fold, key)

    report = evaluate(tmp_path / "whole", bootstrap=0, plots=False, quiet=True)
    per_site = pd.read_csv(tmp_path / "whole" / "report" / "per_site.csv")
    slide_rows = per_site[per_site["level"] == "slide"].set_index("site")
    assert sorted(slide_rows.index) == ["A", "B", "C"]
    assert slide_rows["n"].sum() == len(cohort)
    pooled = report.result("pooled").frame
    for site, row in slide_rows.iterrows():
        rows = pooled[pooled["site"] == site]
        right = (rows["predicted_index"] == rows["label_index"]).mean()
        assert row["accuracy"] == pytest.approx(right)
        tested_in = splits.loc[(splits["site"] == site) & (splits["part"] == "test"), "fold"]
        assert str(row["folds"]) == str(tested_in.iloc[0])  # each site tested in one fold
    assert "## Per site" in (tmp_path / "whole" / "report" / "summary.md").read_text()


def test_site_holdout_from_the_command_line_and_its_errors(tmp_path):
    from slidemil.cli import commands  # noqa: F401  (registers the commands)
    from slidemil.cli.app import app
    from slidemil.errors import CohortError

    work, cohort = _sited_work(tmp_path / "work", views=1)
    out = tmp_path / "run"
    args = ["train", str(work.root), "--out", str(out), "--epochs", "1", "--quiet"]
    args += ["--device", "cpu", "--hidden-dim", "8", "--attention-dim", "8", "--folds", "3"]
    flags = ["--site-holdout", "--views", "random", "--instance-dropout", "0.1"]
    result = CliRunner().invoke(app, [*args, *flags, "--feature-noise", "0.05"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert resolved["site_holdout"] and resolved["views"] == "random"
    assert (resolved["instance_dropout"], resolved["feature_noise"]) == (0.1, 0.05)

    # more folds than sites, a blank site, a patient in two sites: one line each, no run folder
    result = CliRunner().invoke(app, [*args[:-2], "--folds", "4", "--site-holdout", "-o", "x"])
    assert result.exit_code != 0 and "4-fold site holdout needs at least 4 sites" in result.output
    cohort.loc[3, "site"] = ""
    cohort.to_csv(work.root / "cohort.csv", index=False)
    with pytest.raises(CohortError, match=r"cohort.csv.*site column is empty for 1 slide"):
        train(work.root, tmp_path / "blank", folds=3, site_holdout=True, **TINY)
    cohort.loc[3, "site"] = "C" if cohort.loc[2, "site"] != "C" else "B"
    cohort.to_csv(work.root / "cohort.csv", index=False)
    with pytest.raises(CohortError, match="more than one site"):
        train(work.root, tmp_path / "blank", folds=3, site_holdout=True, **TINY)
    assert not (tmp_path / "blank").exists()
    # without --site-holdout the blank and mixed sites are fine (the column is informative)
    train(work.root, tmp_path / "plain", folds=3, epochs=1, **TINY)


def test_a_site_column_added_to_the_cohort_of_an_unfinished_run_lets_it_resume(tmp_path):
    work = make_random_work(tmp_path / "work", patients=12, dim=16, seed=12)
    out = tmp_path / "run"
    train(work.root, out, epochs=2, epoch_budget=1, **TINY)
    cohort = pd.read_csv(work.root / "cohort.csv")
    cohort["site"] = ["AB"[int(p[-3:]) // 2 % 2] for p in cohort["patient_id"]]
    cohort.to_csv(work.root / "cohort.csv", index=False)
    assert train(work.root, out, epochs=2, **TINY).finished
    splits = pd.read_csv(out / "splits.csv")
    assert "site" in splits.columns and set(splits["site"]) == {"A", "B"}
    assert "site" in pd.read_csv(out / "fold_0" / "predictions.csv").columns
    # site holdout is another experiment: refused by the splits (or options) it changes
    with pytest.raises(ConfigError):
        train(work.root, out, epochs=2, site_holdout=True, folds=2, **TINY)


def test_training_bags_carry_the_coords_of_their_drawn_rows(tmp_path):
    """A training bag's coords are those of the rows it drew (``max_patches``, instance
    dropout), batches pad them, and a batch with a bag without coords (a CLAM ``.pt``) has none;
    a coordinate-aware model trains and predicts on them."""
    from foreign_files import write_clam_features
    from slidemil.training.augment import bag_augmentation
    from slidemil.training.bags import BagDataset, pad_bags, probe_feature_file

    work = make_random_work(tmp_path / "work", patients=8, dim=8, instances=(30, 40), seed=5)
    ids = pd.read_csv(work.root / "cohort.csv")["slide_id"].tolist()
    bags = [probe_feature_file(s, work.feature_path(s)) for s in ids]
    config = TrainConfig(max_patches=20, instance_dropout=0.3)
    dataset = BagDataset(
        bags, [0] * len(bags), max_patches=20, sample=True, seed=3,
        augment=bag_augmentation(config, None),
    )  # fmt: skip
    for index, info in enumerate(bags):
        features, _, _, coords = dataset[index]
        with h5py.File(info.path, "r") as f:
            stored, stored_coords = f["features"][:].astype(np.float32), f["coords"][:]
        rows = [int(np.flatnonzero((stored == row.numpy()).all(axis=1))[0]) for row in features]
        np.testing.assert_array_equal(coords.numpy(), stored_coords[rows])
    batch = pad_bags([dataset[0], dataset[1]])
    longest = max(dataset[0][0].shape[0], dataset[1][0].shape[0])
    assert batch[4].shape == (2, longest, 2)
    assert torch.equal(batch[4][0, : dataset[0][0].shape[0]], dataset[0][3])
    _, pt_path = write_clam_features(tmp_path / "clam", "pt", np.ones((5, 8)), np.zeros((5, 2)))
    pt_bag = BagDataset([probe_feature_file("pt", pt_path)], [0])
    assert pt_bag[0][3] is None and pad_bags([dataset[0], pt_bag[0]])[4] is None

    train(
        work.root, tmp_path / "run", model="transmil", folds=2, epochs=1, hidden_dim=16,
        device="cpu", quiet=True, seed=0, max_patches=20, batch_size=2,
    )  # fmt: skip
    assert (tmp_path / "run" / "fold_0" / "predictions.csv").is_file()
