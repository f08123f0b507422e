"""``slidemil patch`` on real SVS files: tissue, physical size, masks, failures, reruns, CLI."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from slidemil.errors import ConfigError
from slidemil.formats.patch_file import read_patch_file
from slidemil.patching import patch
from slidemil.synthetic import load_truth, write_pyramid


@pytest.fixture(scope="module")
def small_work(small_cohort, tmp_path_factory):
    """``small_cohort`` patched once with 128 px patches (read-only: copy before changing)."""
    out = tmp_path_factory.mktemp("small_work")
    summary = patch(small_cohort / "cohort.csv", out, patch_size=128, workers=1, quiet=True)
    return out, summary


def _copy_work(small_work, tmp_path):
    out = tmp_path / "work"
    shutil.copytree(small_work[0], out)
    return out


def test_patches_fall_on_tissue_and_cover_it(small_cohort, small_work):
    out, summary = small_work
    assert not summary.failed and len(summary.patch_counts) == 6
    for slide_id, count in summary.patch_counts.items():
        patches = read_patch_file(out / "patches" / f"{slide_id}.h5")
        assert len(patches) == count > 0
        truth = load_truth(small_cohort, slide_id)
        side = patches.patch_size_level0
        centres = patches.coords + side / 2
        on_tissue = [truth.masks(x, y, 1, 1)[0][0, 0] for x, y in centres]
        # the centres of a few edge patches (half tissue, on a 2 µm/px mask) fall on glass
        assert np.mean(on_tissue) > 0.85, f"{slide_id}: patches off tissue"
        # Coverage: tissue of the truth map inside some patch.
        ds = 16.0
        labels = truth.label_map(ds) > 0
        covered = np.zeros_like(labels)
        for x, y in patches.coords:
            covered[int(y / ds) : int((y + side) / ds), int(x / ds) : int((x + side) / ds)] = True
        assert (labels & covered).sum() / labels.sum() > 0.7, f"{slide_id}: tissue missed"
        assert (out / "previews" / f"{slide_id}.jpg").is_file()
    assert (out / "cohort.csv").is_file() and (out / "patch_config.yaml").is_file()
    assert summary.line().endswith(f"{sum(summary.patch_counts.values())} patches in 6 slides")


def test_patch_file_attributes(small_work):
    patches = read_patch_file(small_work[0] / "patches" / "slide_0000.h5")
    assert patches.patch_size == 128 and patches.step == 128 and patches.target_mpp == 0.5
    assert patches.slide_mpp == pytest.approx(0.5) and patches.read_size == 128
    assert patches.segmentation["sthresh"] == 8 and patches.min_tissue == 0.5
    assert patches.extra["reader"] == "tiles"  # provenance: auto picked the raw-tile reader
    # Grid aligned to multiples of the patch footprint.
    assert np.all(patches.coords % 128 == 0)


def test_same_physical_size_on_mixed_mpp(mixed_mpp_cohort, tmp_path):
    summary = patch(mixed_mpp_cohort / "cohort.csv", tmp_path / "w", workers=1, quiet=True)
    assert not summary.failed
    sizes_um, mpps = set(), set()
    for slide_id in summary.patch_counts:
        patches = read_patch_file(tmp_path / "w" / "patches" / f"{slide_id}.h5")
        sizes_um.add(round(patches.patch_size_level0 * patches.slide_mpp, 6))
        mpps.add(patches.slide_mpp)
        # level 0 is read: 512 px shrunk to 256 on 0.25 µm/px slides, 256 px as is on 0.5
        assert patches.read_level == 0
        assert patches.read_size == round(256 * patches.target_downsample)
        assert np.all(patches.coords % round(patches.patch_size_level0) == 0)
    assert mpps == {0.25, 0.5}
    assert sizes_um == {128.0}, "a patch must cover 256 px × 0.5 µm/px on every slide"


def test_magnification_option(small_cohort, tmp_path):
    cohort = pd.read_csv(small_cohort / "cohort.csv").head(1)
    cohort["path"] = [str(small_cohort / p) for p in cohort["path"]]
    cohort.to_csv(tmp_path / "one.csv", index=False)
    summary = patch(tmp_path / "one.csv", tmp_path / "w", magnification=10, workers=1, quiet=True)
    patches = read_patch_file(tmp_path / "w" / "patches" / "slide_0000.h5")
    assert not summary.failed and patches.magnification == 10 and patches.target_mpp is None
    assert patches.target_downsample == pytest.approx(2.0)  # 20x slide read at 10x
    with pytest.raises(ConfigError, match="not both"):
        patch(tmp_path / "one.csv", tmp_path / "w2", magnification=10, mpp=0.5)


def _one_slide_csv(small_cohort, tmp_path, slide_id, mask_path):
    frame = pd.DataFrame({"slide_id": [slide_id], "mask_path": [str(mask_path)],
                          "path": [str(small_cohort / "slides" / f"{slide_id}.svs")]})  # fmt: skip
    frame.to_csv(tmp_path / "masked.csv", index=False)
    return tmp_path / "masked.csv"


def test_png_mask_overrides_segmentation(small_cohort, tmp_path):
    truth = load_truth(small_cohort, "slide_0001")
    ds = 8.0
    lesion = (truth.label_map(ds) == 2).astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "lesion.png"), lesion)
    csv = _one_slide_csv(small_cohort, tmp_path, "slide_0001", tmp_path / "lesion.png")
    summary = patch(csv, tmp_path / "w", patch_size=64, workers=1, quiet=True)
    patches = read_patch_file(tmp_path / "w" / "patches" / "slide_0001.h5")
    assert not summary.failed and patches.segmentation == {
        "mask_path": str(tmp_path / "lesion.png")
    }
    centres = patches.coords + patches.patch_size_level0 / 2
    in_lesion = [truth.masks(x, y, 1, 1)[1][0, 0] for x, y in centres]
    assert np.mean(in_lesion) > 0.9, "patches must follow the user's mask, not all tissue"


def test_geojson_mask_overrides_segmentation(small_cohort, tmp_path):
    box = [[512, 512], [1024, 512], [1024, 1024], [512, 1024], [512, 512]]
    geometry = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]}}]}  # fmt: skip
    (tmp_path / "box.geojson").write_text(json.dumps(geometry))
    csv = _one_slide_csv(small_cohort, tmp_path, "slide_0002", tmp_path / "box.geojson")
    patch(csv, tmp_path / "w", patch_size=128, min_tissue=0.9, workers=1, quiet=True)
    patches = read_patch_file(tmp_path / "w" / "patches" / "slide_0002.h5")
    assert len(patches) == 16  # the 512 px box is 4 x 4 patches of 128 px
    assert patches.coords.min() >= 512 and patches.coords.max() <= 1024 - 128


def test_bad_slides_are_recorded_and_others_finish(small_cohort, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    good = small_cohort / "slides" / "slide_0000.svs"
    (slides / "truncated.svs").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (slides / "text.svs").write_text("not a slide\n")
    truth = load_truth(small_cohort, "slide_0003")
    write_pyramid(slides / "nompp.svs", 512, 384, truth.render, mpp=None)
    frame = pd.DataFrame({
        "slide_id": ["good", "truncated", "text", "nompp", "good2"],
        "path": [str(good), str(slides / "truncated.svs"), str(slides / "text.svs"),
                 str(slides / "nompp.svs"), str(small_cohort / "slides" / "slide_0001.svs")],
    })  # fmt: skip
    frame.to_csv(tmp_path / "cohort.csv", index=False)
    summary = patch(tmp_path / "cohort.csv", tmp_path / "w", workers=2, quiet=True)
    assert sorted(summary.run.done) == ["good", "good2"]
    failures = pd.read_csv(tmp_path / "w" / "patches" / "failures.csv")
    reasons = dict(zip(failures["slide_id"], failures["reason"], strict=True))
    assert set(reasons) == {"truncated", "text", "nompp"}
    assert reasons["text"] == "unreadable_slide" and reasons["nompp"] == "no_mpp"
    nompp_error = failures.set_index("slide_id").loc["nompp", "error"]
    assert "nompp.svs" in nompp_error and "--slide-mpp" in nompp_error


def test_slide_mpp_fixes_missing_mpp(small_cohort, tmp_path):
    truth = load_truth(small_cohort, "slide_0003")
    write_pyramid(tmp_path / "nompp.svs", 1024, 768, truth.render, mpp=None)
    frame = pd.DataFrame({"slide_id": ["nompp"], "path": [str(tmp_path / "nompp.svs")]})
    frame.to_csv(tmp_path / "cohort.csv", index=False)
    summary = patch(tmp_path / "cohort.csv", tmp_path / "w", slide_mpp=1.0, workers=1, quiet=True)
    assert summary.run.done == ["nompp"]
    patches = read_patch_file(tmp_path / "w" / "patches" / "nompp.h5")
    assert patches.slide_mpp == 1.0 and patches.target_downsample == 0.5  # upsampled 2x


def test_rerun_recomputes_nothing_and_redoes_truncated(small_cohort, small_work, tmp_path):
    out = _copy_work(small_work, tmp_path)
    files = sorted((out / "patches").glob("*.h5"))
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    summary = patch(small_cohort / "cohort.csv", out, patch_size=128, workers=1, quiet=True)
    assert len(summary.run.skipped) == 6 and not summary.run.done
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert summary.patch_counts == small_work[1].patch_counts

    victim = out / "patches" / "slide_0004.h5"
    victim.write_bytes(victim.read_bytes()[:200])
    summary = patch(small_cohort / "cohort.csv", out, patch_size=128, workers=1, quiet=True)
    assert summary.run.done == ["slide_0004"] and len(summary.run.skipped) == 5
    assert len(read_patch_file(victim)) == small_work[1].patch_counts["slide_0004"]


def test_other_options_refused_unless_overwrite(small_cohort, small_work, tmp_path):
    out = _copy_work(small_work, tmp_path)
    with pytest.raises(ConfigError, match="patch_size: 128 -> 256"):
        patch(small_cohort / "cohort.csv", out, patch_size=256, quiet=True)
    summary = patch(
        small_cohort / "cohort.csv", out, patch_size=256, overwrite=True, workers=1, quiet=True,
        shard="1/3",
    )  # fmt: skip
    assert sorted(summary.run.done) == ["slide_0001", "slide_0004"]  # every 3rd from index 1
    assert read_patch_file(out / "patches" / "slide_0001.h5").patch_size == 256


def test_cli(small_cohort, tmp_path):
    from slidemil.cli import (
        app,
        commands,  # noqa: F401 - registers the commands
    )

    result = CliRunner().invoke(
        app, ["patch", str(small_cohort / "cohort.csv"), "--out", str(tmp_path / "w"),
              "--mpp", "1.0", "--patch-size", "64", "--shard", "0/3", "--quiet", "-j", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "patch files:" in result.output and "2 done" in result.output
    assert read_patch_file(tmp_path / "w" / "patches" / "slide_0000.h5").target_mpp == 1.0
    bad = CliRunner().invoke(app, ["patch", str(tmp_path / "none.csv"), "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "none.csv" in bad.output


def _cohort_with_bad_rows(small_cohort, tmp_path):
    """The 6 good slides and 5 bad rows: a missing path, a directory, an empty file, a missing
    mask, and a file OpenSlide cannot read."""
    frame = pd.read_csv(small_cohort / "cohort.csv")
    frame["path"] = [str(small_cohort / p) for p in frame["path"]]
    (tmp_path / "a_folder.svs").mkdir()
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "text.svs").write_text("not a slide\n")
    good = str(small_cohort / "slides" / "slide_0000.svs")
    bad = pd.DataFrame({
        "slide_id": ["gone", "folder", "empty", "nomask", "text"],
        "path": [str(tmp_path / "gone.svs"), str(tmp_path / "a_folder.svs"),
                 str(tmp_path / "empty.svs"), good, str(tmp_path / "text.svs")],
        "mask_path": ["", "", "", str(tmp_path / "no_mask.png"), ""],
    })  # fmt: skip
    mixed = pd.concat([frame.iloc[:3], bad, frame.iloc[3:]], ignore_index=True)
    mixed.to_csv(tmp_path / "cohort.csv", index=False)
    return tmp_path / "cohort.csv"


def test_bad_rows_fail_alone_and_strict_refuses_them_all(small_cohort, tmp_path, caplog):
    from slidemil.errors import BadRowsError

    csv = _cohort_with_bad_rows(small_cohort, tmp_path)
    with pytest.raises(BadRowsError) as info:
        patch(csv, tmp_path / "strict", patch_size=128, strict=True, workers=1, quiet=True)
    message = str(info.value)
    for slide_id in ("gone", "folder", "empty", "nomask", "text"):  # every one, at once
        assert f"{slide_id}: " in message
    assert "\n" not in message and not (tmp_path / "strict").exists()

    with caplog.at_level("WARNING"):
        summary = patch(csv, tmp_path / "w", patch_size=128, workers=2, quiet=True)
    assert len(summary.run.done) == 6
    counted = [r.getMessage() for r in caplog.records if "cannot be processed" in r.getMessage()]
    assert len(counted) == 1 and "4 of 11 slide(s)" in counted[0]
    failures = pd.read_csv(tmp_path / "w" / "patches" / "failures.csv").set_index("slide_id")
    assert failures["reason"].to_dict() == {
        "gone": "slide_missing", "folder": "not_a_file", "empty": "empty_file",
        "nomask": "mask_missing", "text": "unreadable_slide",
    }  # fmt: skip
    assert len(pd.read_csv(tmp_path / "w" / "cohort.csv")) == 11  # later stages see them too


def test_an_interrupted_overwrite_never_leaves_old_options_files(
    small_cohort, small_work, tmp_path
):
    out = _copy_work(small_work, tmp_path)
    # --overwrite with new options, interrupted after some slides (here: only one shard ran)
    patch(small_cohort / "cohort.csv", out, patch_size=256, overwrite=True, shard="0/3",
          workers=1, quiet=True)  # fmt: skip
    # the rerun (without --overwrite) must redo every slide still made with the old options
    summary = patch(small_cohort / "cohort.csv", out, patch_size=256, workers=1, quiet=True)
    assert sorted(summary.run.skipped) == ["slide_0000", "slide_0003"]
    assert len(summary.run.done) == 4
    for path in sorted((out / "patches").glob("slide_*.h5")):
        assert read_patch_file(path).patch_size == 256, f"{path.name} kept the old options"


def _patch_in_process(csv: str, out: str, start, results) -> None:
    from slidemil.patching import patch as run_patch

    start.wait(120)  # a barrier: both processes begin together, however slow their start-up
    summary = run_patch(csv, out, patch_size=128, workers=1, quiet=True)
    results.put((sorted(summary.run.done), sorted(summary.run.locked), dict(summary.failed)))


@pytest.mark.slow
def test_two_patch_processes_on_one_folder_share_the_slides(small_cohort, tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    args = (str(small_cohort / "cohort.csv"), str(tmp_path / "w"), start, results)
    processes = [context.Process(target=_patch_in_process, args=args) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(60)
    done = [slide for finished, _, _ in outcomes for slide in finished]
    assert sorted(done) == sorted(set(done)), "a slide was patched twice"
    assert len(set(done)) == 6, "every slide patched by one of them"
    assert not any(failed for _, _, failed in outcomes)
    assert len(list((tmp_path / "w" / "patches").glob("slide_*.h5"))) == 6
    assert not list((tmp_path / "w" / "patches").glob(".slide_*"))  # no temp file left


def test_cli_strict_refuses_bad_rows_and_the_default_goes_on(small_cohort, tmp_path):
    from slidemil.cli import (
        app,
        commands,  # noqa: F401 - registers the commands
    )

    frame = pd.DataFrame({"slide_id": ["good", "gone"],
                          "path": [str(small_cohort / "slides" / "slide_0000.svs"),
                                   str(tmp_path / "gone.svs")]})  # fmt: skip
    frame.to_csv(tmp_path / "cohort.csv", index=False)
    args = ["patch", str(tmp_path / "cohort.csv"), "--mpp", "2.0", "--patch-size", "64", "-j", "1",
            "--quiet"]  # fmt: skip
    strict = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 2 and "--strict: 1 of 2 row(s)" in strict.output
    assert "gone.svs: file not found" in strict.output and not (tmp_path / "s").exists()
    default = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d")])
    assert default.exit_code == 0, default.output
    assert "1 done, 0 already done, 1 failed (1 bad row)" in default.output


def test_tissue_is_segmented_at_a_physical_resolution(mixed_mpp_cohort, tmp_path):
    """The segmentation image is ``seg_mpp`` µm/px on slides of any scan resolution (the
    nearest level), finer when patches are small, coarser past ``seg_size`` px."""
    from slidemil.patching.run import PatchConfig, segmentation_downsample
    from slidemil.slide import Slide

    def mask_mpp(work, **options):
        patch(mixed_mpp_cohort / "cohort.csv", work, workers=1, quiet=True, **options)
        seen = {}
        for path in sorted((work / "patches").glob("*.h5")):
            patches = read_patch_file(path)
            seen[patches.slide_mpp] = patches.segmentation["downsample"] * patches.slide_mpp
        return seen

    default = mask_mpp(tmp_path / "default")  # 4 µm/px, or the nearest level
    coarse = mask_mpp(tmp_path / "coarse", seg_mpp=16.0, patch_size=512)
    assert set(default) == set(coarse) == {0.25, 0.5}
    for mpp in default:
        # these slides' smallest levels are 1-2 µm/px, within 4x of 4 µm/px: read as they are
        assert 1.0 <= default[mpp] <= 4.0
        # 16 µm/px is over 4x coarser than any level: a thumbnail at 16 µm/px is made
        assert coarse[mpp] == pytest.approx(16.0, rel=0.02)
    slide_path = next((mixed_mpp_cohort / "slides").glob("*.svs"))
    with Slide(slide_path) as slide:
        config = PatchConfig()
        assert segmentation_downsample(slide, config, 256 * 0.5 / slide.mpp) == pytest.approx(
            4.0 / slide.mpp
        )
        # 32 px patches of 0.5 µm/px (16 µm): 16 mask px per patch side -> 1 µm/px
        small = segmentation_downsample(slide, config, 32 * 0.5 / slide.mpp)
        assert small * slide.mpp == pytest.approx(1.0)
        capped = segmentation_downsample(slide, PatchConfig(seg_size=128, seg_mpp=0.5), 256)
        assert max(slide.dimensions) / capped == pytest.approx(128)
