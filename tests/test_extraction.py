"""``slidemil extract`` on real SVS files: features are right and stable, runs resume, bad slides
are reported, shards and torchrun ranks split the cohort, and the CLI works.

Everything runs resnet18 with seeded random weights on 32 px patches, so a run takes a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from slidemil import __version__
from slidemil.encoders import get_encoder
from slidemil.errors import ConfigError, WeightsError
from slidemil.extraction import extract
from slidemil.extraction.dataset import PatchBatches, SlidePatches, batch_size_of, device_images
from slidemil.extraction.distributed import RankInfo, rank_shard
from slidemil.formats.feature_file import read_feature_file
from slidemil.formats.patch_file import read_patch_file, write_patch_file
from slidemil.patching import patch
from slidemil.runner import Shard, read_failures
from slidemil.slide import Slide
from slidemil.synthetic import synth

FAST = {"encoder": "resnet18", "weights": "random", "device": "cpu", "quiet": True}


TORCH_THREADS = 1  # see conftest._torch_threads


@pytest.fixture(scope="module")
def work(small_cohort, tmp_path_factory):
    """``small_cohort`` patched at 2 µm/px with 32 px patches (~400 patches in 6 slides)."""
    out = tmp_path_factory.mktemp("extract_work")
    summary = patch(
        small_cohort / "cohort.csv", out, mpp=2.0, patch_size=32, workers=1, quiet=True,
        previews=False,
    )  # fmt: skip
    assert not summary.failed
    return out


@pytest.fixture(scope="module")
def extracted(work):
    """One reference extraction (float32, batch 16, no workers); read-only."""
    summary = extract(work, **FAST, batch_size=16, workers=0, dtype="float32", features_name="ref")
    assert not summary.failed and len(summary.done) == 6
    return work / "features" / "ref"


def _copy(work: Path, tmp_path: Path) -> Path:
    out = tmp_path / "work"
    shutil.copytree(work, out, ignore=shutil.ignore_patterns("features"))
    return out


def _finished(folder: Path) -> list[Path]:
    """Feature files at their final names (temp files start with a dot)."""
    return sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))


def _slide_ids(work: Path) -> list[str]:
    return pd.read_csv(work / "cohort.csv")["slide_id"].tolist()


def test_features_equal_a_plain_read_then_encode_loop(work, extracted):
    """What a CLAM-style loop gives: read_region per patch, encode, in order."""
    encoder = get_encoder("resnet18", "random")
    slide_id = _slide_ids(work)[0]
    patches = read_patch_file(work / "patches" / f"{slide_id}.h5")
    cohort = pd.read_csv(work / "cohort.csv").set_index("slide_id")
    with Slide(cohort.loc[slide_id, "path"]) as slide:
        images = np.stack(
            [slide.read_region(tuple(xy), patches.read_level, (32, 32)) for xy in patches.coords]
        )
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    bag = read_feature_file(extracted / f"{slide_id}.h5")
    assert bag.features.shape == (len(patches), 512)
    np.testing.assert_array_equal(bag.coords, patches.coords)
    np.testing.assert_allclose(bag.features, expected, rtol=1e-4, atol=1e-4)


def test_features_match_across_batch_sizes_and_worker_counts(work, extracted):
    extract(work, **FAST, batch_size=5, workers=2, dtype="float32", features_name="b5w2")
    for slide_id in _slide_ids(work):
        a = read_feature_file(extracted / f"{slide_id}.h5")
        b = read_feature_file(work / "features" / "b5w2" / f"{slide_id}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options", [{"reader": "openslide"}, {"reader": "tiles", "decode": "device"}]
)
def test_features_match_with_either_reader_and_with_device_decoding(work, extracted, options):
    """OpenSlide and the tile reader give the same features; so does decoding the JPEG tiles
    in the main process with torchvision (the GPU path, run on the CPU here)."""
    name = "_".join(options.values())
    summary = extract(
        work, **FAST, batch_size=16, workers=1, dtype="float32", features_name=name, **options
    )
    assert not summary.failed
    for slide_id in _slide_ids(work):
        a = read_feature_file(extracted / f"{slide_id}.h5").features
        b = read_feature_file(work / "features" / name / f"{slide_id}.h5").features
        assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()  # decoder rounding, not content
    cohort = pd.read_csv(work / "cohort.csv").set_index("slide_id")
    slide_id = _slide_ids(work)[0]
    slides = [
        SlidePatches(slide_id, cohort.loc[slide_id, "path"],
                     read_patch_file(work / "patches" / f"{slide_id}.h5"))
    ]  # fmt: skip
    raw = PatchBatches(slides, 16, reader="tiles", device_decode=True)[0]
    decoded = PatchBatches(slides, 16, reader="tiles")[0]
    assert raw["jpeg"] is not None and raw["reader"] == "tiles"  # only tile bytes travelled
    on_device = device_images(raw, slides[0].patches.patch_size, "cpu")
    assert batch_size_of(raw) == batch_size_of(decoded) == on_device.shape[0]
    assert np.abs(on_device.numpy().astype(int) - decoded["images"].numpy()).max() <= 4


def test_feature_file_records_its_provenance(work, extracted):
    slide_id = _slide_ids(work)[1]
    patches = read_patch_file(work / "patches" / f"{slide_id}.h5")
    with h5py.File(extracted / f"{slide_id}.h5", "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (len(patches), 512)
        np.testing.assert_array_equal(f["coords"][:], patches.coords)
        attrs = dict(f.attrs)
    assert attrs["format_version"] == 1 and attrs["slidemil_version"] == __version__
    assert attrs["encoder"] == "resnet18" and attrs["weights"] == "random:seed=0"
    assert attrs["dtype"] == "float32" and attrs["feature_dim"] == 512
    assert attrs["precision"] == "float32" and attrs["input_size"] == 32
    assert json.loads(attrs["transform"])["mean"] == [0.485, 0.456, 0.406]
    assert attrs["slide_id"] == slide_id and attrs["patch_size"] == 32
    assert attrs["read_level"] == patches.read_level and attrs["target_mpp"] == 2.0
    config = (extracted / "extract_config.yaml").read_text()
    assert "weights_identity: random:seed=0" in config and "batch_size: 16" in config


def test_float16_is_the_default_and_a_finished_folder_is_skipped(work, tmp_path):
    work = _copy(work, tmp_path)
    first = extract(work, **FAST, batch_size=32, workers=0)
    assert len(first.done) == 6
    folder = work / "features" / "resnet18"
    assert read_feature_file(folder / f"{first.done[0]}.h5", dtype=None).features.dtype == (
        np.float16
    )
    stamps = {p.name: p.stat().st_mtime_ns for p in _finished(folder)}
    again = extract(work, **FAST, batch_size=32, workers=0)
    assert not again.done and sorted(again.skipped) == sorted(first.done)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in _finished(folder)}


def test_a_slide_repatched_with_other_coords_of_the_same_count_is_encoded_again(work, tmp_path):
    """Same encoder, same number of patches, other places: the old features are stale."""
    work = _copy(work, tmp_path)
    first = extract(work, **FAST, batch_size=32, workers=0, dtype="float32")
    moved, kept = first.done[0], first.done[1]
    folder = work / "features" / "resnet18"
    before = read_feature_file(folder / f"{moved}.h5")
    patches = read_patch_file(work / "patches" / f"{moved}.h5")
    patches.coords = patches.coords + 8  # re-patched: a shifted grid, the same count
    write_patch_file(work / "patches" / f"{moved}.h5", patches)
    # a file written before fingerprints existed still counts as done when it matches
    with h5py.File(folder / f"{kept}.h5", "a") as f:
        del f.attrs["patch_fingerprint"]

    again = extract(work, **FAST, batch_size=32, workers=0, dtype="float32")
    assert again.done == [moved] and kept in again.skipped
    after = read_feature_file(folder / f"{moved}.h5")
    np.testing.assert_array_equal(after.coords, patches.coords)
    assert len(after) == len(before) and not np.allclose(after.features, before.features)


def test_default_reader_workers_fit_the_cpus_so_torch_does_not_warn(work, tmp_path, monkeypatch):
    from slidemil.config import available_cpus
    from slidemil.extraction.config import ExtractConfig

    assert ExtractConfig().workers <= max(0, available_cpus() - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cpus()))  # a rank per CPU: no readers
    assert ExtractConfig().workers == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    work = _copy(work, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = extract(work, **FAST, batch_size=64)  # default --workers
    assert len(summary.done) == 6
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_other_weights_are_refused_in_the_same_folder(work, tmp_path):
    work = _copy(work, tmp_path)
    ids = _slide_ids(work)
    cohort = pd.read_csv(work / "cohort.csv")
    cohort[cohort.slide_id == ids[0]].to_csv(work / "cohort.csv", index=False)
    extract(work, **FAST, workers=0)
    cohort.to_csv(work / "cohort.csv", index=False)  # more slides to do, now with other weights
    checkpoint = tmp_path / "other.pth"
    torch.save(get_encoder("resnet18", "random").model.state_dict(), checkpoint)
    with pytest.raises(ConfigError, match=r"another weights_identity .*--features-name"):
        extract(work, **{**FAST, "weights": str(checkpoint)}, workers=0)


def test_missing_weights_file_is_one_line_naming_it(work, tmp_path):
    work = _copy(work, tmp_path)
    with pytest.raises(WeightsError) as info:
        extract(work, **{**FAST, "weights": str(tmp_path / "uni.pth")}, workers=0)
    assert str(info.value).count("\n") == 0 and "uni.pth: weights file not found" in str(info.value)
    assert not (work / "features" / "resnet18").exists(), "nothing written before the weights"


def test_bad_slides_are_recorded_and_the_others_finish(work, tmp_path):
    work = _copy(work, tmp_path)
    cohort = pd.read_csv(work / "cohort.csv")
    good = cohort.iloc[0]
    patches = work / "patches"
    broken_svs = tmp_path / "corrupt.svs"
    broken_svs.write_bytes(Path(good.path).read_bytes()[:4096])  # a header and nothing else
    bad = {
        "no_patch_file": good.path,
        "truncated_patch_file": good.path,
        "corrupt_slide": str(broken_svs),
        "missing_slide": str(tmp_path / "gone.svs"),
    }
    shutil.copy(patches / f"{good.slide_id}.h5", patches / "corrupt_slide.h5")
    shutil.copy(patches / f"{good.slide_id}.h5", patches / "missing_slide.h5")
    data = (patches / f"{good.slide_id}.h5").read_bytes()
    (patches / "truncated_patch_file.h5").write_bytes(data[: len(data) // 2])
    rows = [{**good.to_dict(), "slide_id": sid, "path": path} for sid, path in bad.items()]
    # the bad slides sit between good ones: the stream must stay aligned after each failure
    mixed = pd.concat([cohort.iloc[:2], pd.DataFrame(rows), cohort.iloc[2:]], ignore_index=True)
    mixed.to_csv(work / "cohort.csv", index=False)

    summary = extract(work, **FAST, batch_size=8, workers=2)

    assert sorted(summary.failed) == sorted(bad)
    assert sorted(summary.done) == sorted(cohort.slide_id)
    failures = read_failures(work / "features" / "resnet18").set_index("slide_id")
    assert sorted(failures.index) == sorted(bad)
    assert failures.loc["no_patch_file", "reason"] == "bad_artifact"
    assert "patch file not found" in failures.loc["no_patch_file", "error"]
    assert "truncated" in failures.loc["truncated_patch_file", "error"]
    assert failures.loc["corrupt_slide", "reason"] == "unreadable_slide"
    assert failures.loc["missing_slide", "error"].endswith("gone.svs: file not found")
    folder = work / "features" / "resnet18"
    assert not any(folder.glob(".*")) or {p.name for p in folder.glob(".*")} == {".failures"}
    for slide_id in cohort.slide_id:  # good slides after the bad ones are right, not shifted
        expected = read_patch_file(patches / f"{slide_id}.h5").coords
        np.testing.assert_array_equal(read_feature_file(folder / f"{slide_id}.h5").coords, expected)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(
    not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").is_file(),
    reason="needs Linux /proc/<pid>/task/<tid>/children",
)
def test_a_reader_process_killed_mid_run_costs_no_slide(work, extracted, tmp_path):
    """A worker dying (a decoder segfault, an OOM kill) is survived: the slide it hit is read
    again by a fresh loader and every slide ends complete and right."""
    work = _copy(work, tmp_path)
    killed: list[int] = []
    done = threading.Event()

    def kill_first_worker() -> None:
        while not done.is_set():
            workers = _children(os.getpid())
            if workers:
                time.sleep(0.05)  # let it start reading
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    try:
        summary = extract(
            work, **FAST, batch_size=4, workers=2, dtype="float32", features_name="crash"
        )
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was seen"
    assert not summary.failed and sorted(summary.done) == sorted(_slide_ids(work))
    for slide_id in _slide_ids(work):
        a = read_feature_file(extracted / f"{slide_id}.h5")
        b = read_feature_file(work / "features" / "crash" / f"{slide_id}.h5")
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-4)


def test_rank_shard_covers_every_slide_exactly_once():
    items = list(range(23))
    for count in (1, 2, 3, 5):
        for world in (1, 2, 4):
            seen = []
            for index in range(count):
                for rank in range(world):
                    shard = rank_shard(Shard(index, count), RankInfo(rank, world, rank % 2))
                    seen.extend(shard.select(items))
            assert sorted(seen) == items, (count, world)


def test_torchrun_ranks_take_disjoint_shards_that_cover_the_cohort(work, tmp_path, monkeypatch):
    work = _copy(work, tmp_path)
    done = []
    for rank in (0, 1):  # what torchrun --nproc-per-node 2 sets, one rank after the other
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        summary = extract(work, **FAST, workers=0)
        assert not summary.failed and not summary.skipped
        done.append(set(summary.done))
    assert done[0] and done[1] and not done[0] & done[1]
    assert done[0] | done[1] == set(_slide_ids(work))
    assert len(_finished(work / "features" / "resnet18")) == 6


def test_shard_option_selects_every_nth_slide(work, tmp_path):
    work = _copy(work, tmp_path)
    summary = extract(work, **FAST, workers=0, shard="1/3")
    assert summary.done == _slide_ids(work)[1::3]


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_slides(work, tmp_path):
    work = _copy(work, tmp_path)
    cohort = pd.read_csv(work / "cohort.csv")
    # 24 slides (each file listed four times) so the run is still going when it is killed
    copies = []
    for k in range(4):
        part = cohort.copy()
        part["slide_id"] = [f"{s}_c{k}" for s in cohort.slide_id]
        for old, new in zip(cohort.slide_id, part.slide_id, strict=True):
            shutil.copy(work / "patches" / f"{old}.h5", work / "patches" / f"{new}.h5")
        copies.append(part)
    pd.concat(copies).to_csv(work / "cohort.csv", index=False)
    folder = work / "features" / "resnet18"
    command = [
        sys.executable, "-m", "slidemil", "extract", str(work), "--encoder", "resnet18",
        "--weights", "random", "--device", "cpu", "--workers", "0", "--batch-size", "4",
        "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _finished(folder):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no feature file after 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _finished(folder)}
    assert 1 <= len(finished) < 24, "the run must be killed half-way"

    summary = extract(work, **FAST, workers=0, batch_size=4)

    assert sorted(summary.skipped) == sorted(name[:-3] for name in finished)
    assert len(summary.done) + len(summary.skipped) == 24 and not summary.failed
    for name, stamp in finished.items():
        path = folder / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    assert len(_finished(folder)) == 24
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name], "temp files are cleared"
    for path in _finished(folder):
        bag = read_feature_file(path)
        assert len(bag) == len(read_patch_file(work / "patches" / path.name))


def test_cli_extract_and_encoders(work, tmp_path):
    from slidemil.cli import (
        app,
        commands,  # noqa: F401 - registers the commands
    )

    work = _copy(work, tmp_path)
    runner = CliRunner()
    args = ["extract", str(work), "-e", "resnet18", "--weights", "random", "--device", "cpu"]
    result = runner.invoke(app, [*args, "-j", "0", "--batch-size", "64", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert len(_finished(work / "features" / "resnet18")) == 6

    missing = runner.invoke(app, [*args[:4], "--weights", "x.pth", "--features-name", "other"])
    assert missing.exit_code == 2 and "x.pth: weights file not found" in missing.output

    table = runner.invoke(app, ["encoders", "resnet*"])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["name", "output_dim", "input_size"]
    assert any(line.split()[:2] == ["resnet50-trunc", "1024"] for line in lines)
    assert not any(line.startswith("uni") for line in lines)


# -- augmented views and stain normalisation -----------------------------------------------------
VIEWS = {**FAST, "dtype": "float32", "views": 2, "augment": "flip,rot90,hed,colour,blur"}


@pytest.fixture(scope="module")
def viewed(work):
    """A reference extraction with 2 augmented views (batch 16, no workers); read-only."""
    summary = extract(work, **VIEWS, batch_size=16, workers=0, features_name="views_ref")
    assert not summary.failed and len(summary.done) == 6
    return work / "features" / "views_ref"


@pytest.fixture
def channel_mean_encoder():
    """A registered toy encoder that averages each channel over the patch: any flip or quarter
    turn of a patch gives it exactly the same features, any colour change does not."""
    from slidemil.encoders import registry
    from slidemil.encoders.registry import Transform, WeightsSource, register_encoder

    class ChannelMean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.double().mean(dim=(2, 3)).float()

    name = "test-channel-mean"
    register_encoder(
        name, output_dim=3, transform=Transform(), weights=WeightsSource("torchvision", "none"),
        description="test only",
    )(lambda pretrained=False: ChannelMean())  # fmt: skip
    yield name
    registry._REGISTRY.pop(name)


def test_views_are_stored_next_to_plain_features_that_they_leave_unchanged(work, extracted, viewed):
    from slidemil.formats.feature_file import count_views, read_views

    for slide_id in _slide_ids(work):
        plain = read_feature_file(extracted / f"{slide_id}.h5")
        bag = read_feature_file(viewed / f"{slide_id}.h5")
        np.testing.assert_allclose(bag.features, plain.features, rtol=1e-4, atol=1e-4)
        views = read_views(viewed / f"{slide_id}.h5")
        assert views.shape == (2, *plain.features.shape) and count_views(viewed / f"{slide_id}.h5")
        scale = np.abs(plain.features).mean()
        assert np.abs(views[0] - plain.features).mean() > 0.05 * scale  # views are not the patch
        assert np.abs(views[1] - views[0]).mean() > 0.05 * scale  # nor each other
        assert read_views(extracted / f"{slide_id}.h5").shape == (0, *plain.features.shape)
    attrs = bag.attrs
    assert attrs["n_views"] == 2 and attrs["stain_normalization"] is None
    assert attrs["augmentation"] == {
        "views": 2, "ops": ["flip", "rot90", "hed", "colour", "blur"],
        "strengths": {"hed": 0.05, "colour": 0.1, "blur": 1.0}, "seed": 0,
    }  # fmt: skip
    assert read_feature_file(extracted / f"{slide_id}.h5").attrs["n_views"] == 0


def test_views_match_across_batch_sizes_and_worker_counts(work, tmp_path, viewed):
    from slidemil.formats.feature_file import read_views

    work = _copy(work, tmp_path)
    pd.read_csv(work / "cohort.csv").iloc[:3].to_csv(work / "cohort.csv", index=False)
    extract(work, **VIEWS, batch_size=5, workers=2, features_name="views_b5w2")
    for slide_id in _slide_ids(work):
        a = read_views(viewed / f"{slide_id}.h5")
        b = read_views(work / "features" / "views_b5w2" / f"{slide_id}.h5")
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_flips_and_turns_of_a_rotation_invariant_encoder_give_the_plain_features(
    work, tmp_path, channel_mean_encoder
):
    from slidemil.formats.feature_file import read_views

    work = _copy(work, tmp_path)
    common = {**FAST, "encoder": channel_mean_encoder, "dtype": "float32", "workers": 0}
    extract(work, **common, views=3, augment="flip,rot90", features_name="geometric")
    extract(work, **common, views=3, augment="hed,colour", features_name="colour")
    for slide_id in _slide_ids(work):
        plain = read_feature_file(work / "features" / "geometric" / f"{slide_id}.h5").features
        geometric = read_views(work / "features" / "geometric" / f"{slide_id}.h5")
        colour = read_views(work / "features" / "colour" / f"{slide_id}.h5")
        np.testing.assert_allclose(geometric, np.broadcast_to(plain, geometric.shape), atol=1e-5)
        assert (np.abs(colour - plain).max(axis=2) > 1e-2).mean() > 0.9  # almost every patch


def test_a_view_is_reproducible_and_more_views_redo_only_what_differs(work, tmp_path, viewed):
    """Asking more views (or other options) than a file holds makes the slide not done; the
    first views come out the same, and the same options skip every slide."""
    from slidemil.formats.feature_file import read_views

    work = _copy(work, tmp_path)
    pd.read_csv(work / "cohort.csv").iloc[:2].to_csv(work / "cohort.csv", index=False)
    options = {**VIEWS, "batch_size": 16, "workers": 0}
    first = extract(work, **options)
    assert len(first.done) == 2
    assert not extract(work, **options).done
    more = extract(work, **{**options, "views": 3})
    assert sorted(more.done) == sorted(first.done) and not more.skipped
    for slide_id in first.done:  # view v is view v, however many are asked
        three = read_views(work / "features" / "resnet18" / f"{slide_id}.h5")
        np.testing.assert_allclose(three[:2], read_views(viewed / f"{slide_id}.h5"), atol=1e-4)
    stronger = extract(work, **{**options, "views": 3, "augment_strength": "hed=0.2"})
    assert len(stronger.done) == 2
    reseeded = extract(work, **{**options, "views": 3, "augment_seed": 1})
    assert len(reseeded.done) == 2
    back = extract(work, **options)
    assert len(back.done) == 2
    for slide_id in _slide_ids(work):
        views = read_views(work / "features" / "resnet18" / f"{slide_id}.h5")
        np.testing.assert_allclose(views, read_views(viewed / f"{slide_id}.h5"), atol=1e-4)


def test_an_interrupted_extraction_with_views_resumes_to_the_uninterrupted_result(
    work, tmp_path, viewed
):
    from slidemil.formats.feature_file import read_views

    work = _copy(work, tmp_path)
    cohort = pd.read_csv(work / "cohort.csv").iloc[:3]
    cohort.iloc[:1].to_csv(work / "cohort.csv", index=False)  # the run stopped after a slide
    extract(work, **VIEWS, batch_size=7, workers=0)
    folder = work / "features" / "resnet18"
    stamps = {p.name: p.stat().st_mtime_ns for p in _finished(folder)}
    cohort.to_csv(work / "cohort.csv", index=False)
    resumed = extract(work, **VIEWS, batch_size=7, workers=1)
    assert len(resumed.skipped) == 1 and len(resumed.done) == 2
    assert stamps == {p.name: p.stat().st_mtime_ns for p in _finished(folder) if p.name in stamps}
    for slide_id in _slide_ids(work):
        np.testing.assert_allclose(
            read_views(folder / f"{slide_id}.h5"), read_views(viewed / f"{slide_id}.h5"),
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


def _stain_target(work: Path, path: Path, tint: tuple[float, float, float]) -> Path:
    """A PNG of real slide tissue (the first patch of the first slide, at level 0), tinted."""
    from PIL import Image

    slide_id = _slide_ids(work)[0]
    patches = read_patch_file(work / "patches" / f"{slide_id}.h5")
    cohort = pd.read_csv(work / "cohort.csv").set_index("slide_id")
    size = patches.patch_size_level0
    with Slide(cohort.loc[slide_id, "path"]) as slide:
        region = slide.read_region(tuple(patches.coords[len(patches) // 2]), 0, (size, size))
    tinted = np.clip(region[..., :3] * np.array(tint), 0, 255).astype(np.uint8)
    Image.fromarray(tinted).save(path)
    return path


def test_stain_normalisation_changes_features_is_recorded_and_is_never_mixed(
    work, tmp_path, extracted
):
    from slidemil.formats.feature_file import read_views

    work = _copy(work, tmp_path)
    target = _stain_target(work, tmp_path / "target.png", (0.8, 0.9, 1.0))
    stain = {"stain_norm": "reinhard", "stain_target": str(target)}
    ids = _slide_ids(work)
    cohort = pd.read_csv(work / "cohort.csv")
    cohort.iloc[:3].to_csv(work / "cohort.csv", index=False)
    summary = extract(work, **VIEWS, **stain, workers=0)
    assert len(summary.done) == 3
    folder = work / "features" / "resnet18"
    bag = read_feature_file(folder / f"{ids[0]}.h5")
    plain = read_feature_file(extracted / f"{ids[0]}.h5").features
    assert np.abs(bag.features - plain).mean() > 0.05 * np.abs(plain).mean()
    state = bag.attrs["stain_normalization"]
    assert state["method"] == "reinhard" and state["target"]["name"] == "target.png"
    assert read_views(folder / f"{ids[0]}.h5").shape[0] == 2
    recorded = (folder / "extract_config.yaml").read_text()
    assert "stain_normalization:" in recorded and "target.png" in recorded
    # with reader workers on the CPU, they normalise and augment: the same features and views
    extract(work, **VIEWS, **stain, workers=1, batch_size=9, features_name="in_readers")
    for slide_id in ids[:3]:
        here, there = folder / f"{slide_id}.h5", work / "features" / "in_readers" / f"{slide_id}.h5"
        np.testing.assert_allclose(
            read_feature_file(there).features, read_feature_file(here).features, atol=1e-4
        )
        np.testing.assert_allclose(read_views(there), read_views(here), atol=1e-4)

    cohort.to_csv(work / "cohort.csv", index=False)  # more slides, now without normalisation
    with pytest.raises(ConfigError, match=r"another stain_normalization \(.*reinhard fitted on"):
        extract(work, **VIEWS, workers=0)
    other = _stain_target(work, tmp_path / "other.png", (1.0, 0.8, 0.8))
    with pytest.raises(ConfigError, match="another stain_normalization"):
        extract(work, **VIEWS, stain_norm="reinhard", stain_target=str(other), workers=0)
    finished = extract(work, **VIEWS, **stain, workers=0)  # the same normaliser: goes on
    assert len(finished.done) == 3 and len(finished.skipped) == 3


def test_a_folder_from_before_stain_normalisation_is_not_mixed_with_normalised_features(
    work, tmp_path
):
    import yaml

    work = _copy(work, tmp_path)
    cohort = pd.read_csv(work / "cohort.csv")
    cohort.iloc[:2].to_csv(work / "cohort.csv", index=False)
    extract(work, **FAST, workers=0)
    record = work / "features" / "resnet18" / "extract_config.yaml"
    old = yaml.safe_load(record.read_text())
    del old["identity"]["stain_normalization"]  # as written before the key existed
    record.write_text(yaml.safe_dump(old))
    cohort.to_csv(work / "cohort.csv", index=False)
    target = _stain_target(work, tmp_path / "target.png", (0.8, 0.9, 1.0))
    with pytest.raises(ConfigError, match="another stain_normalization"):
        extract(work, **FAST, stain_norm="reinhard", stain_target=str(target), workers=0)


def test_a_bad_stain_target_is_one_line_naming_it(work, tmp_path):
    work = _copy(work, tmp_path)
    with pytest.raises(ConfigError) as info:
        extract(work, **FAST, stain_norm="macenko", stain_target=str(tmp_path / "t.png"))
    assert "t.png" in str(info.value) and "\n" not in str(info.value)


def test_cli_extract_with_views(work, tmp_path):
    from slidemil.cli import (
        app,
        commands,  # noqa: F401 - registers the commands
    )
    from slidemil.formats.feature_file import count_views

    work = _copy(work, tmp_path)
    runner = CliRunner()
    args = ["extract", str(work), "-e", "resnet18", "--weights", "random", "--device", "cpu"]
    args += ["-j", "0", "--quiet", "--views", "2", "--augment", "rot90,hed"]
    result = runner.invoke(app, [*args, "--augment-strength", "hed=0.1", "--augment-seed", "4"])
    assert result.exit_code == 0, result.output
    path = _finished(work / "features" / "resnet18")[0]
    assert count_views(path) == 2
    assert read_feature_file(path).attrs["augmentation"]["strengths"] == {"hed": 0.1}
    bad = runner.invoke(app, [*args, "--augment-strength", "hed=3", "--features-name", "x"])
    assert bad.exit_code == 2 and "strength hed=3.0 is outside [0.0, 1.0]" in bad.output


def test_reader_workers_make_the_views_the_device_path_would(work):
    """On the CPU the readers augment; their views are the main process's, pixel for pixel."""
    from slidemil.augmentation import Augmenter, augment_spec

    cohort = pd.read_csv(work / "cohort.csv").set_index("slide_id")
    slide_id = _slide_ids(work)[2]
    patches = read_patch_file(work / "patches" / f"{slide_id}.h5")
    slides = [SlidePatches(slide_id, cohort.loc[slide_id, "path"], patches)]
    augment = Augmenter(augment_spec(2, "flip,rot90,hed,colour,hue,blur", seed=1))
    made = PatchBatches(slides, 16, augmenter=augment)[1]
    plain = PatchBatches(slides, 16)[1]
    assert torch.equal(made["images"], plain["images"])
    assert made["views"].shape == (2, *plain["images"].shape) and plain["views"] is None
    keys = augment.keys(slide_id, patches.coords[16:32])
    for v in range(2):
        here = augment(plain["images"].permute(0, 3, 1, 2), keys, v).permute(0, 2, 3, 1)
        assert torch.equal(made["views"][v], here)
    with pytest.raises(ValueError, match="cannot be augmented by the readers"):
        PatchBatches(slides, 16, device_decode=True, augmenter=augment)


def test_on_a_multi_site_cohort_stain_normalisation_narrows_the_site_gap_and_views_vary(
    tmp_path, channel_mean_encoder
):
    """Two hospitals staining differently: the channel-mean encoder's features are each
    patch's mean colour, so they show the site gap directly; normalising both sites to a target
    from one of them narrows it, and stain/colour views spread the colours around each patch."""
    from slidemil.formats.feature_file import read_views

    synth(tmp_path / "sites", slides=4, classes=2, sites=2, size=1024, seed=5, quiet=True)
    work = tmp_path / "work"
    patch(
        tmp_path / "sites" / "cohort.csv", work, mpp=2.0, patch_size=32, workers=1, quiet=True,
        previews=False,
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "sites" / "cohort.csv")
    assert table.site.nunique() == 2
    first_site = table[table.site == table.site.iloc[0]]
    target = _stain_target(work, tmp_path / "target.png", (1.0, 1.0, 1.0))  # site A's tissue
    assert _slide_ids(work)[0] in set(first_site.slide_id)
    common = {**FAST, "encoder": channel_mean_encoder, "dtype": "float32", "workers": 0}
    extract(work, **common, features_name="plain", views=2, augment="hed,colour")
    extract(work, **common, features_name="normalised", stain_norm="reinhard",
            stain_target=str(target))  # fmt: skip

    def site_gap(name: str) -> float:
        means = {
            site: np.mean([read_feature_file(work / "features" / name / f"{s}.h5").features.mean(0)
                           for s in rows.slide_id], axis=0)
            for site, rows in table.groupby("site")
        }  # fmt: skip
        a, b = means.values()
        return float(np.abs(a - b).sum())

    assert site_gap("normalised") < 0.6 * site_gap("plain")
    for slide_id in table.slide_id:
        path = work / "features" / "plain" / f"{slide_id}.h5"
        plain, views = read_feature_file(path).features, read_views(path)
        assert (np.abs(views - plain).max(axis=2) > 1e-2).mean() > 0.9
