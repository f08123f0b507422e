"""CLAM's and TRIDENT's own files end to end: train on their feature folders, predict from them,
and draw heat maps with the geometry of their patch files (written by ``tests/foreign_files``
exactly as those tools write them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from foreign_files import (
    clam_grid,
    level_geometry,
    trident_coords_dir,
    trident_grid,
    write_clam_features,
    write_clam_patch_file,
    write_trident_features,
    write_trident_patch_file,
)
from slidemil.errors import ConfigError
from slidemil.formats.attention_file import read_attention_file
from slidemil.formats.feature_file import read_feature_file
from slidemil.formats.patch_file import read_patch_file
from slidemil.heatmaps import heatmap
from slidemil.prediction import predict
from slidemil.slide import Slide
from slidemil.training import train

TORCH_THREADS = 2  # see conftest._torch_threads

DIM = 32
WIDTH, HEIGHT = 2048, 1536  # level 0 at 0.5 µm/px, 20x; level 1 at downsample 4
CLAM_LEVEL, CLAM_SIZE = 1, 32  # CLAM reads 32 px at level 1: 128 level-0 px
CONTOURS = [(101, 77, 900, 700), (1200, 830, 700, 600)]  # tissue bounding boxes, level-0 px
LESION_X = 1200  # patches right of this carry the malignant signal
TRIDENT_MAGS, TRIDENT_SIZE = (20, 10), 64  # 64 px at 10x of a 20x slide: 128 level-0 px
ENCODER = "uni_v1"


def bag_at(coords: np.ndarray, malignant: bool, seed: int) -> np.ndarray:
    """Noise features; on malignant slides the patches in the lesion carry a signal."""
    rng = np.random.default_rng(seed)
    features = rng.normal(0.0, 1.0, size=(len(coords), DIM)).astype(np.float32)
    if malignant:
        features[coords[:, 0] >= LESION_X, : DIM // 2] += 3.0
    return features


def _render(x0, y0, w, h, downsample):
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.full((h, w, 3), 240, np.uint8)
    image[((xx * downsample + x0) // 97 + (yy * downsample + y0) // 89) % 2 == 0] = (200, 120, 170)
    return image


def _in_box(coords: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return (
        (coords[:, 0] >= x) & (coords[:, 0] < x + w) & (coords[:, 1] >= y) & (coords[:, 1] < y + h)
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Eight real SVS slides with CLAM's patch and feature folders and TRIDENT's job folder
    for them, and a cohort CSV."""
    from slidemil.synthetic import write_pyramid

    root = tmp_path_factory.mktemp("foreign_job")
    clam_patches, clam_features = root / "clam_patches", root / "clam_features"
    trident = trident_coords_dir(root / "trident_job", TRIDENT_MAGS[1], TRIDENT_SIZE)
    rows, clam_coords = [], {}
    for i in range(8):
        slide_id, malignant = f"case_{i}", i % 2 == 1
        path = write_pyramid(root / "slides" / f"{slide_id}.svs", WIDTH, HEIGHT, _render,
                             mpp=0.5, magnification=20, slide_name=slide_id)  # fmt: skip
        level = level_geometry(path, CLAM_LEVEL)
        contours = clam_grid(CONTOURS, CLAM_SIZE, level["level_downsample"][0], CLAM_SIZE)
        write_clam_patch_file(clam_patches, slide_id, contours, patch_size=CLAM_SIZE,
                              patch_level=CLAM_LEVEL, **level)  # fmt: skip
        coords = np.concatenate(contours)
        clam_coords[slide_id] = coords
        write_clam_features(clam_features, slide_id, bag_at(coords, malignant, i), coords, 40)
        grid = trident_grid(WIDTH, HEIGHT, TRIDENT_SIZE, *TRIDENT_MAGS)
        tissue = grid[np.any([_in_box(grid, box) for box in CONTOURS], axis=0)]
        write_trident_patch_file(trident, slide_id, tissue, patch_size=TRIDENT_SIZE,
                                 src_mag=TRIDENT_MAGS[0], target_mag=TRIDENT_MAGS[1],
                                 width=WIDTH, height=HEIGHT)  # fmt: skip
        for saveas in ("h5", "pt"):
            write_trident_features(trident, slide_id, bag_at(tissue, malignant, 100 + i),
                                   encoder=ENCODER, saveas=saveas)  # fmt: skip
        label = "malignant" if malignant else "benign"
        rows.append({"slide_id": slide_id, "path": str(path), "label": label,
                     "patient_id": f"p{i}"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return {
        "root": root, "csv": root / "cohort.csv", "clam_patches": clam_patches,
        "clam_features": clam_features, "trident": trident, "clam_coords": clam_coords,
    }  # fmt: skip


def _work_linking(root, name, folder, csv):
    """A work folder whose features/<name> is a link to another tool's feature folder."""
    work = root / f"work_{name}"
    (work / "features").mkdir(parents=True)
    (work / "features" / name).symlink_to(folder, target_is_directory=True)
    (work / "cohort.csv").write_bytes(csv.read_bytes())
    return work


TRAIN_OPTIONS = dict(folds=2, epochs=4, hidden_dim=16, attention_dim=8, lr=1e-2, monitor="loss",
                     device="cpu", quiet=True, seed=0, cache=True)  # fmt: skip


@pytest.fixture(scope="module")
def clam_run(job):
    """A run trained on CLAM's pt_files, linked in as work/features/clam_pt (read from the
    files at every access: no cache)."""
    work = _work_linking(job["root"], "clam_pt", job["clam_features"] / "pt_files", job["csv"])
    result = train(work, job["root"] / "run_pt", **{**TRAIN_OPTIONS, "cache": False})
    assert result.finished and not result.excluded
    return job["root"] / "run_pt"


# --- the files, read as written ------------------------------------------------------------------


def test_clam_patch_file_keeps_its_order_anchor_and_level(job):
    path = job["clam_patches"] / "patches" / "case_0.h5"
    expected = job["clam_coords"]["case_0"]
    assert tuple(expected[0]) == (101, 77) and tuple(expected[1]) == (101, 77 + 128)  # y inner
    without_slide = read_patch_file(path)
    with Slide(job["root"] / "slides" / "case_0.svs") as slide:
        with_slide = read_patch_file(path, slide)
    for patches in (without_slide, with_slide):
        np.testing.assert_array_equal(patches.coords, expected)
        assert patches.source_format == "clam" and patches.read_level == CLAM_LEVEL
        assert patches.read_size == CLAM_SIZE and patches.patch_size_level0 == 128.0
        assert patches.slide_dimensions == (WIDTH, HEIGHT)  # level_dim is level 1's size
    assert with_slide.target_mpp == pytest.approx(2.0)


def test_clam_h5_and_pt_features_are_the_same_bag(job):
    h5 = read_feature_file(job["clam_features"] / "h5_files" / "case_1.h5")
    pt = read_feature_file(job["clam_features"] / "pt_files" / "case_1.pt")
    assert h5.attrs["source_format"] == "clam-h5" and pt.attrs["source_format"] == "clam-pt"
    np.testing.assert_array_equal(h5.features, pt.features)
    np.testing.assert_array_equal(h5.coords, job["clam_coords"]["case_1"])
    assert h5.attrs["has_coords"] and not pt.attrs["has_coords"]


def test_trident_files_carry_their_geometry(job):
    patches = read_patch_file(job["trident"] / "patches" / "case_0_patches.h5")
    assert patches.source_format == "trident" and patches.patch_size_level0 == 128.0
    assert patches.slide_dimensions == (WIDTH, HEIGHT) and patches.step == TRIDENT_SIZE
    assert np.all(patches.coords % 128 == 0)  # TRIDENT's grid starts at 0
    bag = read_feature_file(job["trident"] / f"features_{ENCODER}" / "case_0.h5")
    assert bag.attrs["source_format"] == "trident" and bag.encoder == ENCODER
    np.testing.assert_array_equal(bag.coords, patches.coords)


# --- train on their folders ----------------------------------------------------------------------


@pytest.mark.slow
def test_training_on_clam_h5_clam_pt_and_trident_folders(job, clam_run):
    """The same features in CLAM's h5_files (its --feat_dir linked whole) train the same
    models as its pt_files; TRIDENT's features_<encoder> folder trains too."""
    root = job["root"]
    work = _work_linking(root, "clam_dir", job["clam_features"], job["csv"])
    train(work, root / "run_h5", **TRAIN_OPTIONS)
    from_pt = pd.read_csv(clam_run / "fold_0" / "predictions.csv")
    from_h5 = pd.read_csv(root / "run_h5" / "fold_0" / "predictions.csv")
    pd.testing.assert_frame_equal(from_pt, from_h5)
    work = _work_linking(root, ENCODER, job["trident"] / f"features_{ENCODER}", job["csv"])
    result = train(work, root / "run_trident", **TRAIN_OPTIONS)
    assert result.finished and not result.excluded
    predictions = pd.concat(
        pd.read_csv(root / "run_trident" / f"fold_{k}" / "predictions.csv") for k in (0, 1)
    )
    assert len(predictions) == 8


# --- predict and draw ----------------------------------------------------------------------------


@pytest.mark.slow
def test_clam_pt_bags_predict_and_map_with_the_clam_patch_files(job, clam_run, tmp_path):
    from slidemil.cli import app
    from slidemil.cli import commands as _  # noqa: F401 - registers the commands

    out = tmp_path / "preds"
    result = CliRunner().invoke(
        app,
        ["predict", str(clam_run), str(job["csv"]), "--out", str(out), "--quiet",
         "--features", str(job["clam_features"] / "pt_files"),
         "--patches", str(job["clam_patches"])],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 8 and (table["label"] == table["predicted"]).mean() >= 0.75
    for slide_id, coords in job["clam_coords"].items():
        attention = read_attention_file(out / "attention" / f"{slide_id}.h5")
        np.testing.assert_array_equal(attention.coords, coords)  # taken from the patch file
        assert attention.patch_size_level0 == 128.0 and attention.attrs["read_level"] == 1
        assert attention.attrs["geometry_source"].startswith("patch file")
    summary = heatmap(out, tmp_path / "maps", top_k=2, quiet=True)
    assert len(summary.done) == 8 and not summary.failed
    assert (tmp_path / "maps" / "case_1.png").is_file()


@pytest.mark.slow
def test_without_geometry_only_the_heat_map_fails_and_says_both_ways(job, clam_run, tmp_path):
    with_patches = predict(clam_run, job["csv"], tmp_path / "a", quiet=True,
                           features=job["clam_features"] / "pt_files",
                           patches=job["clam_patches"])  # fmt: skip
    bare = predict(clam_run, job["csv"], tmp_path / "b", quiet=True,
                   features=job["clam_features"])  # CLAM's --feat_dir: its h5_files  # fmt: skip
    assert not bare.failed and len(bare.predictions) == 8
    columns = ["prob_benign", "prob_malignant"]
    np.testing.assert_allclose(
        bare.predictions[columns].to_numpy(), with_patches.predictions[columns].to_numpy(),
        atol=1e-6,
    )  # fmt: skip
    attention = read_attention_file(tmp_path / "b" / "attention" / "case_0.h5")
    np.testing.assert_array_equal(attention.coords, job["clam_coords"]["case_0"])
    assert attention.placement_problem is not None
    maps = heatmap(tmp_path / "b", tmp_path / "maps_b", quiet=True)
    assert set(maps.failed) == set(job["clam_coords"]) and not maps.done
    failures = pd.read_csv(tmp_path / "maps_b" / "failures.csv")
    assert failures["error"].str.contains("--patches").all()
    assert failures["error"].str.contains("--patch-size-level0").all()

    # an explicit footprint places bags that have coordinates (h5_files) ...
    sized = predict(clam_run, job["csv"], tmp_path / "c", quiet=True, patch_size_level0=128,
                    features=job["clam_features"] / "h5_files")  # fmt: skip
    assert not sized.failed
    assert not heatmap(tmp_path / "c", tmp_path / "maps_c", top_k=0, quiet=True).failed
    # ... but not bags without them (pt_files), and the map says so
    predict(clam_run, job["csv"], tmp_path / "d", quiet=True, patch_size_level0=128,
            features=job["clam_features"] / "pt_files", shard="0/4")  # fmt: skip
    maps = heatmap(tmp_path / "d", tmp_path / "maps_d", quiet=True)
    assert list(maps.failed) == ["case_0", "case_4"]
    assert "no patch coordinates" in maps.failed["case_0"]


@pytest.mark.slow
def test_a_patch_file_of_another_slide_fails_only_that_map(job, clam_run, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for slide_id in ("case_0", "case_1"):
        source = job["clam_patches"] / "patches" / f"{slide_id}.h5"
        (patches / f"{slide_id}.h5").write_bytes(source.read_bytes())
    # the patch file of case_1 cut with another grid: same slide, other coordinates
    other = clam_grid([(5, 9, 900, 700), (1200, 830, 700, 600)], CLAM_SIZE, 4.0, CLAM_SIZE)
    level = level_geometry(job["root"] / "slides" / "case_1.svs", CLAM_LEVEL)
    (patches / "case_1.h5").unlink()
    write_clam_patch_file(tmp_path, "case_1", other, patch_size=CLAM_SIZE,
                          patch_level=CLAM_LEVEL, **level)  # fmt: skip
    summary = predict(clam_run, job["csv"], tmp_path / "out", quiet=True, shard="0/8",
                      features=job["clam_features"] / "h5_files", patches=patches)  # fmt: skip
    assert not summary.failed
    summary = predict(clam_run, job["csv"], tmp_path / "out1", quiet=True, shard="1/8",
                      features=job["clam_features"] / "h5_files", patches=patches)  # fmt: skip
    assert not summary.failed
    bad = read_attention_file(tmp_path / "out1" / "attention" / "case_1.h5")
    assert "other coordinates" in bad.placement_problem
    assert (
        read_attention_file(tmp_path / "out" / "attention" / "case_0.h5").placement_problem is None
    )


@pytest.mark.slow
def test_trident_bags_are_placed_by_their_own_attributes_or_patch_files(job, tmp_path):
    root = job["root"]
    work = _work_linking(root, f"t_{ENCODER}", job["trident"] / f"features_{ENCODER}", job["csv"])
    train(work, root / "run_t", **TRAIN_OPTIONS)
    h5 = predict(root / "run_t", job["csv"], tmp_path / "h5", quiet=True,
                 features=job["trident"] / f"features_{ENCODER}")  # fmt: skip
    assert not h5.failed
    attention = read_attention_file(tmp_path / "h5" / "attention" / "case_3.h5")
    assert attention.patch_size_level0 == 128.0 and attention.attrs["magnification"] == 10
    assert attention.attrs["geometry_source"] == "feature file"
    assert not heatmap(tmp_path / "h5", tmp_path / "maps", top_k=1, quiet=True).failed

    # TRIDENT's .pt bags (NumPy arrays) need its patch files, found under the coords folder
    features_pt = tmp_path / "features_pt"
    features_pt.mkdir()
    for path in (job["trident"] / f"features_{ENCODER}").glob("*.pt"):
        (features_pt / path.name).write_bytes(path.read_bytes())
    pt = predict(root / "run_t", job["csv"], tmp_path / "pt", quiet=True, features=features_pt,
                 patches=job["trident"])  # fmt: skip
    assert not pt.failed
    columns = ["prob_benign", "prob_malignant"]
    np.testing.assert_allclose(
        pt.predictions[columns].to_numpy(), h5.predictions[columns].to_numpy(), atol=1e-6
    )
    from_pt = read_attention_file(tmp_path / "pt" / "attention" / "case_3.h5")
    np.testing.assert_array_equal(from_pt.coords, attention.coords)
    assert from_pt.patch_size_level0 == 128.0


def test_geometry_options_apply_to_existing_features_only(tmp_path):
    csv = tmp_path / "cohort.csv"  # options are checked before the run or the CSV is read
    with pytest.raises(ConfigError, match="patches and patch_size_level0 place the patches"):
        predict(tmp_path, csv, tmp_path / "o", patches=tmp_path, patch_size_level0=64)
    with pytest.raises(ConfigError, match="patch_size_level0"):
        predict(tmp_path, csv, tmp_path / "o", patch_size_level0=-1, features=tmp_path)


def test_pt_bags_are_probed_without_reading_and_broken_ones_are_named(job, tmp_path):
    import torch

    from slidemil.training.bags import probe_feature_file, read_bag

    pt = job["clam_features"] / "pt_files" / "case_0.pt"
    n = len(job["clam_coords"]["case_0"])
    info = probe_feature_file("case_0", pt)
    assert (info.n_instances, info.dim, info.nbytes) == (n, DIM, n * DIM * 4)
    h5 = job["clam_features"] / "h5_files" / "case_0.h5"
    np.testing.assert_array_equal(read_bag(pt), read_bag(h5))
    trident_pt = job["trident"] / f"features_{ENCODER}" / "case_0.pt"  # a pickled NumPy array
    info = probe_feature_file("case_0", trident_pt)
    assert info.dim == DIM and info.n_instances == len(read_bag(trident_pt)) > 0
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    assert "cannot read .pt features" in probe_feature_file("bad", tmp_path / "bad.pt")
    torch.save({"features": torch.zeros(3, 4)}, tmp_path / "dict.pt")
    assert "expected a tensor" in probe_feature_file("dict", tmp_path / "dict.pt")
