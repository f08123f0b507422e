"""``slidemil predict``: predictions and attention files from features or raw slides, the fold
ensemble, resuming, failures, the CLI, and an end-to-end check that attention finds lesions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from foreign_files import (
    trident_coords_dir,
    write_clam_features,
    write_clam_patch_file,
    write_trident_features,
    write_trident_patch_file,
)
from slidemil.errors import ArtifactError, ConfigError
from slidemil.formats.attention_file import (
    AttentionMap,
    is_complete_attention_file,
    read_attention_file,
    write_attention_file,
)
from slidemil.formats.feature_file import read_feature_file, write_feature_file
from slidemil.heatmaps import heatmap, localisation_auc, patch_mask_fraction
from slidemil.prediction import PredictConfig, predict
from slidemil.training import train
from slidemil.training.checkpoint import load_model_from_checkpoint

CLASSES = ("benign", "malignant")
DIM = 16
PATCH0 = 128.0  # patch footprint in level-0 px of the toy bags


TORCH_THREADS = 2  # see conftest._torch_threads


def write_toy_work(root, slides: int = 16, seed: int = 0):
    """A work folder of real slidemil feature files with patch geometry: noise bags in which a
    few instances of a malignant slide carry a signal. Slide files are not needed."""
    rng = np.random.default_rng(seed)
    rows, signal = [], {}
    for i in range(slides):
        slide_id = f"toy_{i:02d}"
        label = i % 2
        n = int(rng.integers(12, 25))
        features = rng.normal(3.0, 2.0, size=(n, DIM)).astype(np.float32)
        rows_with_signal = rng.choice(n, 3, replace=False)
        if label:
            features[rows_with_signal, : DIM // 2] += 6.0
        signal[slide_id] = rows_with_signal
        k = np.arange(n)
        coords = np.stack([(k % 6) * PATCH0, (k // 6) * PATCH0], axis=1).astype(np.int64)
        attrs = {
            "slide_id": slide_id, "encoder": "toy", "weights": "random:seed=0",
            "patch_size": 64, "patch_size_level0": PATCH0, "read_level": 0, "read_size": 128,
            "target_downsample": 2.0, "step": 64, "target_mpp": 1.0, "slide_mpp": 0.5,
            "slide_dimensions": [768, 640],
        }  # fmt: skip
        write_feature_file(root / "features" / "toy" / f"{slide_id}.h5", features, coords, attrs)
        rows.append(
            {
                "slide_id": slide_id,
                "path": f"slides/{slide_id}.svs",
                "label": CLASSES[label],
                "patient_id": f"patient_{i:02d}",
            }
        )
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return signal


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 2-fold run trained on toy bags: (work folder, run folder)."""
    root = tmp_path_factory.mktemp("toy")
    write_toy_work(root / "work")
    train(
        root / "work", root / "run", folds=2, epochs=10, hidden_dim=16, attention_dim=8,
        lr=1e-2, monitor="loss", device="cpu", quiet=True, seed=0,
    )  # fmt: skip
    return root / "work", root / "run"


@pytest.fixture(scope="module")
def toy_predictions(toy, tmp_path_factory):
    work, run = toy
    out = tmp_path_factory.mktemp("toy_preds")
    summary = predict(run, work / "cohort.csv", out, features=work / "features" / "toy", quiet=True)
    return out, summary


def prob_columns(frame: pd.DataFrame) -> list[str]:
    return [f"prob_{c}" for c in CLASSES]


# --- from features ------------------------------------------------------------------------------


def test_predictions_and_attention_files_from_features(toy, toy_predictions):
    work, run = toy
    out, summary = toy_predictions
    table = pd.read_csv(out / "predictions.csv")
    assert summary.failed == {} and len(summary.run.done) == 16
    assert list(table.columns) == [
        "slide_id", "patient_id", "label", *prob_columns(table), "predicted", "calibration",
        "n_patches",
    ]  # fmt: skip
    assert (table["calibration"] == "none").all()  # no --calibrate: raw model probabilities
    assert table.equals(summary.predictions.reset_index(drop=True)) or len(table) == 16
    probabilities = table[prob_columns(table)].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert list(table["predicted"]) == [CLASSES[k] for k in probabilities.argmax(axis=1)]
    assert (table["label"] == table["predicted"]).mean() >= 0.75  # the toy task is learnable

    for row in table.itertuples():
        bag = read_feature_file(work / "features" / "toy" / f"{row.slide_id}.h5")
        attention = read_attention_file(out / "attention" / f"{row.slide_id}.h5")
        np.testing.assert_array_equal(attention.coords, bag.coords)
        assert attention.attention.shape == attention.attention_raw.shape == (len(bag), 2)
        np.testing.assert_allclose(attention.attention.sum(axis=0), 1.0, atol=1e-5)
        assert np.isfinite(attention.attention_raw).all()
        attrs = attention.attrs
        assert attrs["models"] == ["fold_0", "fold_1"]
        assert attrs["class_names"] == list(CLASSES)
        assert attrs["predicted"] == row.predicted and attrs["label"] == row.label
        assert attrs["n_patches"] == row.n_patches == len(bag)
        assert attrs["patch_size_level0"] == PATCH0 and attrs["slide_mpp"] == 0.5
        assert attrs["run"] == str(run.resolve())
        np.testing.assert_allclose(attrs["probabilities"], [row.prob_benign, row.prob_malignant])
    assert (out / "predict_config.yaml").is_file() and not (out / "failures.csv").exists()


def test_the_ensemble_is_the_mean_of_the_folds_each_with_its_own_standardisation(
    toy, toy_predictions, tmp_path
):
    work, run = toy
    out, _ = toy_predictions
    features = work / "features" / "toy"
    folds = {
        name: predict(
            run, work / "cohort.csv", tmp_path / name, features=features, model=name, quiet=True
        ).predictions
        for name in ("fold_0", "fold_1")
    }
    mean = pd.read_csv(out / "predictions.csv")
    columns = prob_columns(mean)
    expected = (folds["fold_0"][columns].to_numpy() + folds["fold_1"][columns].to_numpy()) / 2
    np.testing.assert_allclose(mean[columns].to_numpy(), expected, atol=1e-6)

    # fold 0 alone, computed by hand from its checkpoint: its own mean and std, then the model
    model, state = load_model_from_checkpoint(run / "fold_0" / "checkpoint_best.pt")
    mean_std = state["standardization"]
    other = torch.load(run / "fold_1" / "checkpoint_best.pt", weights_only=True)
    assert not torch.equal(mean_std["mean"], other["standardization"]["mean"])
    bag = read_feature_file(features / "toy_03.h5")
    x = (torch.from_numpy(bag.features) - mean_std["mean"]) / mean_std["std"]
    with torch.no_grad():
        logits, weights = model(x[None], torch.ones(1, len(bag), dtype=torch.bool))
    by_hand = torch.softmax(logits, dim=1)[0].numpy()
    row = folds["fold_0"].set_index("slide_id").loc["toy_03"]
    np.testing.assert_allclose(row[columns].to_numpy(float), by_hand, atol=1e-5)
    single = read_attention_file(tmp_path / "fold_0" / "attention" / "toy_03.h5")
    ensembled = read_attention_file(out / "attention" / "toy_03.h5")
    np.testing.assert_allclose(single.attention[:, 0], weights[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(ensembled.attention[:, 0], single.attention[:, 0], atol=1e-6)
    assert single.attrs["models"] == ["fold_0"]


def test_a_cohort_with_sites_gives_per_site_rows_for_an_external_evaluation(toy, tmp_path):
    """predictions.csv carries the cohort's site column, so `evaluate --external` reports each
    site of the new cohort."""
    from slidemil.evaluation import evaluate

    work, shared_run = toy
    run = shutil.copytree(shared_run, tmp_path / "run")  # evaluate writes report/ into the run
    cohort = pd.read_csv(work / "cohort.csv")
    # the labels alternate: both classes at each site
    cohort["site"] = ["north" if i < len(cohort) // 2 else "south" for i in range(len(cohort))]
    cohort.to_csv(tmp_path / "sites.csv", index=False)
    out = tmp_path / "preds"
    predict(run, tmp_path / "sites.csv", out, features=work / "features" / "toy", quiet=True)
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns[:4]) == ["slide_id", "patient_id", "site", "label"]
    assert (
        table.set_index("slide_id")["site"].to_dict()
        == cohort.set_index("slide_id")["site"].to_dict()
    )

    evaluate(run, external=out / "predictions.csv", quiet=True)
    per_site = pd.read_csv(run / "report" / "per_site.csv")
    external = per_site[(per_site["cohort"] == "external") & (per_site["level"] == "slide")]
    assert sorted(external["site"]) == ["north", "south"]
    assert external["n"].sum() == len(cohort)


def test_a_rerun_resumes_and_still_lists_every_slide(toy, toy_predictions, tmp_path):
    work, run = toy
    out = tmp_path / "preds"
    shutil.copytree(toy_predictions[0], out)
    (out / "attention" / "toy_05.h5").unlink()
    (out / "predictions.csv").unlink()
    summary = predict(run, work / "cohort.csv", out, features=work / "features" / "toy", quiet=True)
    assert summary.run.done == ["toy_05"] and len(summary.run.skipped) == 15
    assert len(pd.read_csv(out / "predictions.csv")) == 16
    # a shard only predicts its slides, but the table lists all the folder holds
    shard = predict(
        run, work / "cohort.csv", out, features=work / "features" / "toy", shard="1/4", quiet=True
    )
    assert len(shard.run.skipped) == 4 and len(shard.predictions) == 16
    # another model choice in the same folder is refused, not mixed in
    with pytest.raises(ConfigError, match="new --out"):
        predict(run, work / "cohort.csv", out, features=work / "features", model="fold_1")


def test_bad_bags_are_recorded_and_the_others_predicted(toy, tmp_path):
    work, run = toy
    features = tmp_path / "features"
    shutil.copytree(work / "features" / "toy", features)
    good = read_feature_file(features / "toy_00.h5")
    write_feature_file(  # a slide without patches
        features / "toy_01.h5", np.zeros((0, DIM), np.float32), np.zeros((0, 2)), good.attrs
    )
    write_feature_file(  # features of another encoder size
        features / "toy_02.h5", np.zeros((5, 8), np.float32), good.coords[:5], good.attrs
    )
    (features / "toy_03.h5").unlink()  # never extracted
    (features / "toy_04.h5").write_bytes(b"not an HDF5 file")
    summary = predict(run, work / "cohort.csv", tmp_path / "out", features=features, quiet=True)
    assert set(summary.failed) == {"toy_01", "toy_02", "toy_03", "toy_04"}
    failures = pd.read_csv(tmp_path / "out" / "failures.csv").set_index("slide_id")
    assert failures.loc["toy_01", "reason"] == "no_tissue"
    assert failures.loc["toy_02", "reason"] == "bad_artifact"
    assert "8-d features but the model takes 16-d" in failures.loc["toy_02", "error"]
    assert "feature file not found" in failures.loc["toy_03", "error"]
    assert len(summary.predictions) == 12


def test_clam_and_trident_feature_files_predict_like_slidemil_ones(toy, toy_predictions, tmp_path):
    """The toy bags as CLAM (h5 and pt, with its patch files) and TRIDENT write them give the
    same predictions, coordinates and attention as the slidemil files."""
    work, run = toy
    features = tmp_path / "features"
    shutil.copytree(work / "features" / "toy", features)
    clam_save_dir = tmp_path / "clam"
    for slide_id in ("toy_00", "toy_01", "toy_02"):
        bag = read_feature_file(features / f"{slide_id}.h5")
        (features / f"{slide_id}.h5").unlink()
        if slide_id == "toy_02":  # TRIDENT: 64 px at 10x of a 20x slide, 128 level-0 px
            coords_dir = trident_coords_dir(tmp_path / "trident", 10, 64)
            write_trident_patch_file(coords_dir, slide_id, bag.coords, patch_size=64, src_mag=20,
                                     target_mag=10, width=768, height=640)  # fmt: skip
            written = write_trident_features(coords_dir, slide_id, bag.features, encoder="toy")
            shutil.copy(written, features / f"{slide_id}.h5")
            continue
        # CLAM: 128 px read at level 0; toy_00 as h5_files, toy_01 as pt_files (no coords)
        level = {"level_downsample": (1.0, 1.0), "level_dim": (768, 640)}
        write_clam_patch_file(clam_save_dir, slide_id, [bag.coords], patch_size=128,
                              patch_level=0, **level)  # fmt: skip
        h5_path, pt_path = write_clam_features(tmp_path / "clam_feats", slide_id, bag.features,
                                               bag.coords)  # fmt: skip
        shutil.copy(h5_path if slide_id == "toy_00" else pt_path, features)
    summary = predict(run, work / "cohort.csv", tmp_path / "out", features=features,
                      patches=clam_save_dir, quiet=True)  # fmt: skip
    assert not summary.failed
    columns = prob_columns(summary.predictions)
    native = toy_predictions[1].predictions.set_index("slide_id")
    ours = summary.predictions.set_index("slide_id")
    for slide_id in ("toy_00", "toy_01", "toy_02"):
        attention = read_attention_file(tmp_path / "out" / "attention" / f"{slide_id}.h5")
        before = read_attention_file(toy_predictions[0] / "attention" / f"{slide_id}.h5")
        assert attention.patch_size_level0 == 128.0 and attention.attrs["read_level"] == 0
        assert attention.attrs["slide_dimensions"] == [768, 640]
        np.testing.assert_array_equal(attention.coords, before.coords)
        np.testing.assert_allclose(attention.attention, before.attention, atol=1e-6)
        expected = native.loc[slide_id, columns].to_numpy(float)
        np.testing.assert_allclose(ours.loc[slide_id, columns].to_numpy(float), expected, atol=1e-6)


def test_options_and_runs_are_checked_before_any_work(toy, tmp_path):
    work, run = toy
    csv = work / "cohort.csv"
    with pytest.raises(ConfigError, match="--step"):
        predict(run, csv, tmp_path, features=work / "features" / "toy", step=32)
    with pytest.raises(ConfigError, match="fold_<k>"):
        predict(run, csv, tmp_path, model="best")
    with pytest.raises(ConfigError, match="fold_0, fold_1"):
        predict(run, csv, tmp_path, model="fold_7", features=work / "features" / "toy")
    with pytest.raises(ArtifactError, match="not a training run"):
        predict(work, csv, tmp_path, features=work / "features" / "toy")
    # the toy features were not made by slidemil patch / extract: raw slides cannot be matched
    with pytest.raises(ConfigError, match="--features"):
        predict(run, csv, tmp_path / "raw", quiet=True)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"predict": {"model": "fold_1", "quiet": True}}))
    summary = predict(
        run, csv, tmp_path / "yaml", config_file=config, features=work / "features" / "toy"
    )
    first = read_attention_file(tmp_path / "yaml" / "attention" / "toy_00.h5")
    assert first.attrs["models"] == ["fold_1"] and not summary.failed
    assert PredictConfig(model="fold_12").model == "fold_12"


def test_attention_files_round_trip_and_refuse_what_they_cannot_place(tmp_path):
    coords = np.array([[0, 0], [256, 0]])
    attention = AttentionMap(
        coords, np.array([0.25, 0.75]), np.array([-1.0, 0.1]), {"patch_size_level0": 256.0}
    )
    path = write_attention_file(tmp_path / "a.h5", attention)
    back = read_attention_file(path)
    assert back.attention.shape == (2, 1) and back.mean_attention().tolist() == [0.25, 0.75]
    assert is_complete_attention_file(path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    assert not is_complete_attention_file(path)
    with pytest.raises(ArtifactError, match="truncated"):
        read_attention_file(path)
    write_attention_file(path, AttentionMap(coords, np.ones(2), np.ones(2), {"format_version": 9}))
    with pytest.raises(ArtifactError, match="newer"):
        read_attention_file(path)
    # without a patch geometry the file is whole (the prediction stands), only placing fails
    problem = {"patch_size_level0": None, "geometry_problem": "no patch file s.h5 in patches/"}
    write_attention_file(path, AttentionMap(coords, np.ones(2), np.ones(2), problem))
    assert is_complete_attention_file(path)
    unplaced = read_attention_file(path)
    assert unplaced.placement_problem == problem["geometry_problem"]
    with pytest.raises(ArtifactError, match=r"a\.h5: cannot place.*--patches.*--patch-size-level0"):
        _ = unplaced.patch_size_level0


def test_cli_predicts_from_features(toy, tmp_path):
    from slidemil.cli import app
    from slidemil.cli import commands as _  # noqa: F401 - registers the commands

    work, run = toy
    result = CliRunner().invoke(
        app,
        ["predict", str(run), str(work / "cohort.csv"), "--out", str(tmp_path / "p"),
         "--features", str(work / "features" / "toy"), "--model", "fold_1", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "16 done" in result.output
    assert len(pd.read_csv(tmp_path / "p" / "predictions.csv")) == 16
    bad = CliRunner().invoke(app, ["predict", str(run), str(work / "cohort.csv"), "-o", "x",
                                   "--model", "best"])  # fmt: skip
    assert bad.exit_code == 2 and "fold_<k>" in bad.output


# --- from raw slides ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """8 small real SVS slides, patched and encoded (resnet18, random weights), a 2-fold run."""
    from slidemil.extraction import extract
    from slidemil.patching import patch
    from slidemil.synthetic import synth

    root = tmp_path_factory.mktemp("slide_run")
    synth(root / "cohort", slides=8, classes=2, size=1024, seed=3, max_slides_per_patient=1,
          quiet=True)  # fmt: skip
    patch(root / "cohort" / "cohort.csv", root / "work", mpp=1.0, patch_size=64, workers=1,
          previews=False, quiet=True)  # fmt: skip
    extract(root / "work", encoder="resnet18", weights="random", device="cpu", batch_size=64,
            workers=0, quiet=True)  # fmt: skip
    train(root / "work", root / "run", folds=2, epochs=2, hidden_dim=16, attention_dim=8,
          device="cpu", quiet=True)  # fmt: skip
    return root


@pytest.mark.slow
def test_raw_slides_and_their_features_give_the_same_predictions(slide_run, tmp_path):
    csv = slide_run / "cohort" / "cohort.csv"
    raw = predict(slide_run / "run", csv, tmp_path / "raw", device="cpu", workers=0, quiet=True)
    from_features = predict(
        slide_run / "run", csv, tmp_path / "feat", quiet=True,
        features=slide_run / "work" / "features" / "resnet18",
    )  # fmt: skip
    assert not raw.failed and len(raw.predictions) == 8
    columns = [c for c in raw.predictions.columns if c.startswith("prob_")]
    np.testing.assert_allclose(
        raw.predictions[columns].to_numpy(), from_features.predictions[columns].to_numpy(),
        atol=1e-4,
    )  # fmt: skip
    a = read_attention_file(tmp_path / "raw" / "attention" / "slide_0000.h5")
    b = read_attention_file(tmp_path / "feat" / "attention" / "slide_0000.h5")
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.attention, b.attention, atol=1e-4)
    # the new slides were cut with the options the run recorded
    used = yaml.safe_load((tmp_path / "raw" / "work" / "patch_config.yaml").read_text())["patch"]
    trained = yaml.safe_load((slide_run / "work" / "patch_config.yaml").read_text())["patch"]
    runtime = {"workers", "quiet", "shard", "overwrite"}
    assert {k: v for k, v in used.items() if k not in runtime} == {
        k: v for k, v in trained.items() if k not in runtime
    }


@pytest.mark.slow
def test_a_corrupt_and_an_empty_slide_fail_alone(slide_run, tmp_path):
    from slidemil.synthetic import write_pyramid

    frame = pd.read_csv(slide_run / "cohort" / "cohort.csv").head(3)
    frame["path"] = [str(slide_run / "cohort" / p) for p in frame["path"]]
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(b"II*\x00" + bytes(1000))

    def glass(x0, y0, w, h, downsample):
        return np.full((h, w, 3), 243, np.uint8)

    empty = write_pyramid(tmp_path / "empty.svs", 1024, 768, glass, mpp=0.5, magnification=20)
    extra = pd.DataFrame(
        {"slide_id": ["corrupt", "empty"], "path": [str(corrupt), str(empty)],
         "label": frame["label"].iloc[0], "patient_id": ["px", "py"], "slide_mpp": 0.5}
    )  # fmt: skip
    csv = tmp_path / "new.csv"
    pd.concat([frame, extra]).to_csv(csv, index=False)
    summary = predict(slide_run / "run", csv, tmp_path / "out", device="cpu", workers=0, quiet=True)
    assert set(summary.failed) == {"corrupt", "empty"}
    assert len(summary.predictions) == 3
    failures = pd.read_csv(tmp_path / "out" / "failures.csv").set_index("slide_id")
    assert failures.loc["empty", "reason"] == "no_tissue"
    assert failures.loc["corrupt", "reason"] == "unreadable_slide"
    assert "patch" in failures.loc["corrupt", "error"]


@pytest.mark.slow
def test_denser_reinference_with_overlapping_patches(slide_run, tmp_path):
    csv = slide_run / "cohort" / "cohort.csv"
    dense = predict(slide_run / "run", csv, tmp_path / "dense", step=32, device="cpu",
                    workers=0, shard="0/4", quiet=True)  # fmt: skip
    plain = read_feature_file(slide_run / "work" / "features" / "resnet18" / "slide_0000.h5")
    attention = read_attention_file(tmp_path / "dense" / "attention" / "slide_0000.h5")
    assert not dense.failed
    assert attention.attrs["step"] == 32 and attention.attrs["patch_size"] == 64
    assert attention.patch_size_level0 == 128.0  # the same patches, at half their spacing
    assert len(attention) > 3 * len(plain)
    assert np.all(attention.coords % 64 == 0)
    used = yaml.safe_load((tmp_path / "dense" / "work" / "patch_config.yaml").read_text())["patch"]
    trained = yaml.safe_load((slide_run / "work" / "patch_config.yaml").read_text())["patch"]
    changed = {k for k in trained if used.get(k) != trained[k]}
    assert changed - {"workers", "quiet", "shard"} == {"step"}  # every other option kept
    summary = heatmap(tmp_path / "dense", tmp_path / "maps", smooth=0.5, quiet=True, top_k=2)
    assert summary.done == ["slide_0000", "slide_0004"]  # shard 0/4 of 8 slides
    assert (tmp_path / "maps" / "slide_0000.png").is_file()


@pytest.mark.slow
def test_cli_predicts_raw_slides_then_draws_heatmaps(slide_run, tmp_path):
    from slidemil.cli import app
    from slidemil.cli import commands as _  # noqa: F401 - registers the commands

    runner = CliRunner()
    result = runner.invoke(
        app,
        ["predict", str(slide_run / "run"), str(slide_run / "cohort" / "cohort.csv"),
         "--out", str(tmp_path / "p"), "--device", "cpu", "--workers", "0", "--shard", "1/4",
         "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["heatmap", str(tmp_path / "p"), "--tiff", "--quiet"])
    assert result.exit_code == 0, result.output
    maps = tmp_path / "p" / "heatmaps"
    assert {p.suffix for p in maps.iterdir()} >= {".png", ".geojson", ".tiff"}


@pytest.mark.slow
def test_integrated_gradient_heat_maps_differ_from_attention_ones(slide_run, tmp_path):
    import cv2

    csv = slide_run / "cohort" / "cohort.csv"
    features = slide_run / "work" / "features" / "resnet18"
    maps = {}
    for method in ("attention", "ig"):
        out = tmp_path / method
        predict(slide_run / "run", csv, out, features=features, explain=method, ig_steps=8,
                shard="0/4", quiet=True)  # fmt: skip
        assert heatmap(out, out / "maps", top_k=0, geojson=False, quiet=True).done
        maps[method] = cv2.imread(str(out / "maps" / "slide_0000.png")).astype(int)
    assert maps["ig"].shape == maps["attention"].shape
    assert np.abs(maps["ig"] - maps["attention"]).mean() > 1.0  # other scores, other colours
    per_class = heatmap(tmp_path / "ig", tmp_path / "all", class_name="all", top_k=0, quiet=True)
    classes = read_attention_file(tmp_path / "ig" / "attention" / "slide_0000.h5").class_names
    assert per_class.done and all(
        (tmp_path / "all" / f"slide_0000_{c}.png").is_file() for c in classes
    )


# --- end to end: does attention find the lesions? -------------------------------------------------


def write_lesion_cohort(root, slides: int, size: int):
    """Real SVS slides from the synthetic scenes: every second slide keeps its lesions ("lesion"),
    the others have them removed ("normal"), as in a tumour-vs-normal task. Returns the
    ground-truth lesion masks at downsample 4."""
    from slidemil.synthetic import make_scene, write_pyramid

    rows, masks = [], {}
    for i in range(slides):
        rng = np.random.default_rng(1000 + i)
        width, height = size, round(size * rng.uniform(0.65, 0.85))
        scene = make_scene(rng, width, height, 0.5, 0, lesion_fraction=(0.15, 0.25))
        if i % 2 == 0:
            scene.lesions = []
        slide_id = f"slide_{i:02d}"
        path = write_pyramid(root / f"{slide_id}.svs", width, height, scene.render, mpp=0.5,
                             magnification=20, slide_name=slide_id)  # fmt: skip
        masks[slide_id] = scene.label_map(4.0) == 2
        rows.append({"slide_id": slide_id, "path": path.name,
                     "label": "lesion" if i % 2 else "normal", "patient_id": slide_id})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return masks


@pytest.mark.slow
def test_attention_is_higher_inside_the_lesions(tmp_path):
    from slidemil.extraction import extract
    from slidemil.patching import patch

    masks = write_lesion_cohort(tmp_path / "cohort", slides=16, size=2048)
    patch(tmp_path / "cohort" / "cohort.csv", tmp_path / "work", mpp=1.0, patch_size=64,
          workers=2, previews=False, quiet=True)  # fmt: skip
    extract(tmp_path / "work", encoder="resnet18", weights="random", device="cpu",
            batch_size=128, workers=1, quiet=True)  # fmt: skip
    train(tmp_path / "work", tmp_path / "run", folds=2, epochs=30, hidden_dim=64,
          attention_dim=32, lr=2e-3, monitor="loss", device="cpu", quiet=True)  # fmt: skip
    summary = predict(tmp_path / "run", tmp_path / "cohort" / "cohort.csv", tmp_path / "preds",
                      features=tmp_path / "work" / "features" / "resnet18", quiet=True)  # fmt: skip
    assert not summary.failed

    aucs = {}
    for slide_id, mask in masks.items():
        if not mask.any():
            continue  # normal slides have nothing to find
        attention = read_attention_file(tmp_path / "preds" / "attention" / f"{slide_id}.h5")
        inside = patch_mask_fraction(attention.coords, attention.patch_size_level0, mask, 4.0)
        aucs[slide_id] = localisation_auc(attention.mean_attention(), inside)
    mean_auc = float(np.nanmean(list(aucs.values())))
    print(f"attention-vs-lesion AUC: mean {mean_auc:.3f} over {len(aucs)} lesion slides; "
          f"per slide {json.dumps({k: round(v, 3) for k, v in aucs.items()})}")  # fmt: skip
    predictions = summary.predictions
    accuracy = float((predictions["label"] == predictions["predicted"]).mean())
    print(f"slide accuracy {accuracy:.3f}")
    assert mean_auc >= 0.85
    assert min(aucs.values()) > 0.6


# --- explanations ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_ig_predictions(toy, tmp_path_factory):
    work, run = toy
    out = tmp_path_factory.mktemp("toy_ig")
    summary = predict(
        run, work / "cohort.csv", out, features=work / "features" / "toy", explain="ig",
        ig_steps=16, quiet=True,
    )  # fmt: skip
    return out, summary


def test_attention_predictions_record_native_class_agnostic_scores(toy_predictions):
    out, _ = toy_predictions
    attention = read_attention_file(out / "attention" / "toy_00.h5")
    assert attention.attrs["format_version"] == 2 and attention.explanation == "attention"
    assert not attention.class_specific  # abmil-gated has no per-class attention
    assert attention.class_scores.shape == (len(attention), 2, len(CLASSES))
    for c in range(len(CLASSES)):
        np.testing.assert_array_equal(attention.class_scores[:, :, c], attention.attention_raw)


def test_predict_explain_ig_writes_class_specific_attributions(
    toy, toy_predictions, toy_ig_predictions, tmp_path
):
    plain, ig = toy_predictions[0], toy_ig_predictions[0]
    signal_rows = write_toy_work(tmp_path)  # the toy run's bags again, with their planted rows
    aucs = []
    for row in pd.read_csv(ig / "predictions.csv").itertuples():
        explained = read_attention_file(ig / "attention" / f"{row.slide_id}.h5")
        native = read_attention_file(plain / "attention" / f"{row.slide_id}.h5")
        assert explained.explanation == "ig" and explained.class_specific
        assert explained.attrs["explanation_settings"] == {"baseline": "zero", "steps": 16}
        assert explained.class_scores.shape == (len(native), 2, len(CLASSES))
        # /attention and /attention_raw keep their meaning whatever the method
        np.testing.assert_allclose(explained.attention, native.attention, atol=1e-6)
        np.testing.assert_allclose(explained.attention_raw, native.attention_raw, atol=1e-5)
        np.testing.assert_allclose(explained.attrs["probabilities"], native.attrs["probabilities"])
        malignant = explained.class_score("malignant")
        assert not np.allclose(malignant, explained.class_score("benign"))
        if row.label == "malignant":  # the planted rows carry the malignant logit
            signal = np.isin(np.arange(len(malignant)), signal_rows[row.slide_id])
            aucs.append(localisation_auc(malignant, signal.astype(float)))
    assert np.mean(aucs) > 0.9, aucs


def test_the_ensemble_explains_each_fold_on_its_standardised_input(toy):
    from slidemil.explanation import ExplanationSettings, explain
    from slidemil.prediction.ensemble import Ensemble
    from slidemil.prediction.trained_run import TrainedRun

    work, run_dir = toy
    run = TrainedRun.open(run_dir)
    settings = ExplanationSettings("ig", baseline="mean", steps=8)
    ensemble = Ensemble.load(
        run.checkpoints("mean"), run.class_names, run.feature_dim, torch.device("cpu"),
        explanation=settings,
    )  # fmt: skip
    bag = read_feature_file(work / "features" / "toy" / "toy_01.h5").features
    result = ensemble.infer(bag)
    assert result.explanation == "ig" and result.class_scores.shape == (len(bag), 2, 2)
    for f, fold in enumerate(ensemble.folds):
        assert fold.mean is not None  # the toy run standardises
        x = fold.model_input(torch.from_numpy(bag))
        expected = explain(fold.model, x, "ig", baseline="mean", steps=8).scores[fold.order]
        np.testing.assert_allclose(result.class_scores[:, f, :], expected.T, atol=1e-5)
        raw = explain(fold.model, bag, "ig", baseline="mean", steps=8).scores[fold.order]
        assert not np.allclose(result.class_scores[:, f, :], raw.T, atol=1e-3)


def test_explanation_methods_do_not_mix_and_exports_explain_only_by_attention(
    toy, toy_predictions, tmp_path
):
    from slidemil.deployment import export

    work, run = toy
    out, _ = toy_predictions
    features = work / "features" / "toy"
    with pytest.raises(ConfigError, match=r"made by --explain attention, not ig \(baseline zero"):
        predict(run, work / "cohort.csv", out, features=features, explain="ig", quiet=True)
    with pytest.raises(ValueError, match="ig_steps"):
        PredictConfig(explain="ig", ig_steps=0)
    model = export(run, tmp_path / "model", format="torchscript").out
    with pytest.raises(ConfigError, match="exported graph gives only its attention"):
        predict(model, work / "cohort.csv", tmp_path / "p", features=features, explain="ig")
    exported = predict(model, work / "cohort.csv", tmp_path / "p", features=features, quiet=True)
    attention = read_attention_file(tmp_path / "p" / "attention" / "toy_00.h5")
    assert not exported.failed and attention.explanation == "attention"
    assert not attention.class_specific and attention.class_scores.shape[2] == len(CLASSES)


def test_cli_explains_with_integrated_gradients(toy, tmp_path):
    from slidemil.cli import app
    from slidemil.cli import commands as _  # noqa: F401 - registers the commands

    work, run = toy
    csv = tmp_path / "two.csv"
    pd.read_csv(work / "cohort.csv").head(2).to_csv(csv, index=False)
    config = tmp_path / "exp.yaml"  # the YAML section chooses the method, a flag the steps
    config.write_text("predict:\n  explain: ig\n  ig_baseline: mean\n  ig_steps: 16\n")
    result = CliRunner().invoke(
        app,
        ["predict", str(run), str(csv), "--out", str(tmp_path / "p"), "--features",
         str(work / "features" / "toy"), "--config", str(config), "--ig-steps", "4", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    attention = read_attention_file(tmp_path / "p" / "attention" / "toy_00.h5")
    assert attention.explanation == "ig"
    assert attention.attrs["explanation_settings"] == {"baseline": "mean", "steps": 4}


def test_transmil_predicts_on_the_patch_grid_whatever_the_order_of_the_rows(tmp_path):
    """Prediction passes each bag's coords to a coordinate-aware model: the same slides with
    their feature files' rows shuffled give the same probabilities and per-patch attention."""
    work = tmp_path / "work"
    write_toy_work(work)
    train(
        work, tmp_path / "run", model="transmil", folds=2, epochs=2, hidden_dim=16,
        device="cpu", quiet=True, seed=0,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    shuffled = tmp_path / "shuffled"
    for path in sorted((work / "features" / "toy").glob("*.h5")):
        bag = read_feature_file(path)
        rows = rng.permutation(len(bag.features))
        write_feature_file(shuffled / path.name, bag.features[rows], bag.coords[rows], bag.attrs)
    csv = work / "cohort.csv"
    first = predict(
        tmp_path / "run", csv, tmp_path / "p1", features=work / "features" / "toy", quiet=True
    )
    second = predict(tmp_path / "run", csv, tmp_path / "p2", features=shuffled, quiet=True)
    a, b = first.predictions.sort_values("slide_id"), second.predictions.sort_values("slide_id")
    columns = prob_columns(a)
    np.testing.assert_allclose(a[columns].to_numpy(), b[columns].to_numpy(), atol=1e-5)
    for name in ("toy_00", "toy_01"):
        plain = read_attention_file(tmp_path / "p1" / "attention" / f"{name}.h5")
        moved = read_attention_file(tmp_path / "p2" / "attention" / f"{name}.h5")
        by_place = {tuple(xy): w for xy, w in zip(plain.coords, plain.attention, strict=True)}
        expected = np.stack([by_place[tuple(xy)] for xy in moved.coords])
        np.testing.assert_allclose(moved.attention, expected, atol=1e-5)
