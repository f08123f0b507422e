"""Faults at the edges of the stages after patching: bad rows in extraction and heat maps, and
heat maps interrupted with new options (the patch stage's are in test_patching.py, the runner's
locks and fingerprints in test_runner.py). Every file is real: SVS slides, HDF5 artifacts."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from slidemil.errors import BadRowsError
from slidemil.extraction import extract
from slidemil.formats.attention_file import AttentionMap, write_attention_file
from slidemil.heatmaps import heatmap
from slidemil.patching import patch
from slidemil.runner import read_failures
from slidemil.synthetic import write_pyramid

TORCH_THREADS = 1  # see conftest._torch_threads
FAST = {"encoder": "resnet18", "weights": "random", "device": "cpu", "quiet": True}
PATCH = 128


def _pink(x0, y0, w, h, downsample):
    image = np.full((h, w, 3), 243, np.uint8)
    image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 110, 170)  # tissue in the middle
    return image


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """A predictions folder of three attention files over real 512 x 384 px SVS slides."""
    root = tmp_path_factory.mktemp("reliability")
    xs, ys = np.meshgrid(np.arange(0, 512, PATCH), np.arange(0, 384, PATCH))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    scores = np.linspace(0.0, 1.0, len(coords))
    for i in range(3):
        slide = write_pyramid(root / f"s{i}.svs", 512, 384, _pink, mpp=0.5, magnification=20)
        attrs = {"slide_id": f"s{i}", "slide_path": str(slide), "models": ["fold_0"],
                 "class_names": ["a", "b"], "probabilities": [0.4, 0.6], "predicted": "b",
                 "patch_size_level0": float(PATCH), "patch_size": PATCH, "read_level": 0,
                 "read_size": PATCH, "step": PATCH, "slide_mpp": 0.5}  # fmt: skip
        write_attention_file(
            root / "preds" / "attention" / f"s{i}.h5",
            AttentionMap(coords, scores / scores.sum(), scores, attrs),
        )
    return root / "preds"


def _copy(predictions, tmp_path):
    target = tmp_path / "preds"
    shutil.copytree(predictions, target)
    return target


DRAW = {"top_k": 0, "geojson": False, "thumbnail_size": 256, "quiet": True}


def test_a_heatmap_run_interrupted_with_new_options_keeps_no_old_figure(predictions, tmp_path):
    preds = _copy(predictions, tmp_path)
    heatmap(preds, tmp_path / "h", cmap="jet", **DRAW)
    old = {p.name: p.read_bytes() for p in (tmp_path / "h").glob("s*.png")}
    assert len(old) == 3
    # a run with another colour map, interrupted after one slide (here: only one shard ran)
    heatmap(preds, tmp_path / "h", cmap="viridis", shard="0/3", **DRAW)
    rerun = heatmap(preds, tmp_path / "h", cmap="viridis", **DRAW)
    assert rerun.skipped == ["s0"] and sorted(rerun.done) == ["s1", "s2"]
    for name, before in old.items():
        assert (tmp_path / "h" / name).read_bytes() != before, f"{name} kept the old colours"
    assert heatmap(preds, tmp_path / "h", cmap="viridis", **DRAW).skipped == ["s0", "s1", "s2"]


def test_heatmap_bad_rows_fail_alone_and_strict_refuses_them(predictions, tmp_path):
    preds = _copy(predictions, tmp_path)
    (preds / "attention" / "s1.h5").write_bytes(b"\x89HDF\r\n" + bytes(100))  # truncated
    cohort = pd.DataFrame({"slide_id": ["s0", "s1", "s2"],
                           "path": [str(predictions.parent / "s0.svs"), "x.svs",
                                    str(tmp_path / "moved.svs")]})  # fmt: skip
    cohort.to_csv(tmp_path / "cohort.csv", index=False)
    with pytest.raises(BadRowsError, match=r"2 of 3 row\(s\).*s1: .*s2: .*moved\.svs"):
        heatmap(preds, tmp_path / "strict", cohort=tmp_path / "cohort.csv", strict=True, **DRAW)
    assert not (tmp_path / "strict").exists()
    summary = heatmap(preds, tmp_path / "h", cohort=tmp_path / "cohort.csv", **DRAW)
    assert summary.done == ["s0"] and sorted(summary.bad) == ["s1", "s2"]
    reasons = read_failures(tmp_path / "h").set_index("slide_id")["reason"].to_dict()
    assert reasons == {"s1": "bad_artifact", "s2": "slide_missing"}


@pytest.fixture(scope="module")
def work(small_cohort, tmp_path_factory):
    """A work folder patched from two real slides and a row whose slide is missing."""
    root = tmp_path_factory.mktemp("reliability_work")
    slides = small_cohort / "slides"
    cohort = pd.DataFrame({"slide_id": ["s0", "gone", "s2"],
                           "path": [str(slides / "slide_0000.svs"), str(root / "gone.svs"),
                                    str(slides / "slide_0002.svs")]})  # fmt: skip
    cohort.to_csv(root / "cohort.csv", index=False)
    summary = patch(root / "cohort.csv", root / "w", mpp=2.0, patch_size=64, workers=1, quiet=True)
    assert sorted(summary.run.done) == ["s0", "s2"] and summary.run.bad == ["gone"]
    return root / "w"


def test_extract_carries_patchings_reason_and_strict_refuses(work, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(work, folder)
    (folder / "patches" / "s2.h5").write_bytes(b"")  # an interrupted copy of the work folder
    with pytest.raises(BadRowsError, match=r"2 of 3 row\(s\).*gone: patch: .*s2\.h5: empty"):
        extract(folder, **FAST, strict=True)
    assert not (folder / "features").exists()
    summary = extract(folder, **FAST)
    assert summary.done == ["s0"] and sorted(summary.bad) == ["gone", "s2"]
    failures = read_failures(folder / "features" / "resnet18").set_index("slide_id")
    assert failures.loc["gone", "reason"] == "slide_missing"  # patching's reason, kept
    assert failures.loc["gone", "error"].startswith("patch: ")
    assert failures.loc["s2", "reason"] == "bad_artifact"
