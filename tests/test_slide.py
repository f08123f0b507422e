"""Slide access on real SVS / TIFF files written by synth."""

from __future__ import annotations

import shutil
import tracemalloc

import cv2
import numpy as np
import pytest

from flat_slides import write_flat_tiff
from slidemil.errors import MissingMppError, SlideOpenError, SlideReadError
from slidemil.slide import REGION_CHUNK, Slide
from slidemil.synthetic import SlideScene, load_truth, write_pyramid


def _slide_path(cohort_dir, index=0):
    return cohort_dir / "slides" / f"slide_{index:04d}.svs"


def test_opens_aperio_with_metadata(small_cohort):
    with Slide(_slide_path(small_cohort)) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.objective_power == pytest.approx(20)
        assert slide.level_count >= 2
        assert slide.level_downsamples[1] == pytest.approx(4, rel=0.01)
        assert slide.dimensions[0] == 2048


def test_mixed_resolutions_have_same_physical_size(mixed_mpp_cohort):
    sizes_um = set()
    for path in sorted((mixed_mpp_cohort / "slides").glob("*.svs")):
        with Slide(path) as slide:
            sizes_um.add(round(slide.dimensions[0] * slide.mpp))
            assert slide.objective_power == pytest.approx(10 / slide.mpp)
    assert sizes_um == {768}


def test_read_region_at_lesion_returns_lesion_pixels(small_cohort):
    slide_id = "slide_0000"
    scene = load_truth(small_cohort, slide_id)
    lesion = scene.lesions[0]
    x, y, size = int(lesion.cx) - 16, int(lesion.cy) - 16, 32
    _, in_lesion = scene.masks(x, y, size, size)
    assert in_lesion.mean() > 0.9, "ground truth places the lesion here"
    with Slide(_slide_path(small_cohort)) as slide:
        pixels = slide.read_region((x, y), 0, (size, size)).astype(float)
    expected = scene.render(x, y, size, size).astype(float)
    assert np.abs(pixels - expected).mean() < 12  # JPEG error only
    # and lesion pixels differ from the surrounding stroma of the same slide
    stroma = _stroma_patch(scene, size)
    assert np.abs(expected.mean((0, 1)) - stroma.mean((0, 1))).max() > 8


def _stroma_patch(scene: SlideScene, size: int) -> np.ndarray:
    step = size * 2
    for y in range(0, scene.height - size, step):
        for x in range(0, scene.width - size, step):
            tissue, lesion = scene.masks(x, y, size, size)
            if tissue.all() and not lesion.any():
                return scene.render(x, y, size, size).astype(float)
    raise AssertionError("no stroma found")


def test_read_plan_and_scaled_read(mixed_mpp_cohort):
    for path in sorted((mixed_mpp_cohort / "slides").glob("*.svs")):
        with Slide(path) as slide:
            plan = slide.plan_for_mpp(1.0)
            # within 1% a level is used as is (pyramid sizes are rounded), never resized
            assert plan.target_downsample * slide.mpp == pytest.approx(1.0, rel=0.01)
            assert plan.level_downsample <= plan.target_downsample + 1e-6
            image = slide.read_scaled((0, 0), plan, (64, 48))
            assert image.shape == (48, 64, 3) and image.dtype == np.uint8


def test_thumbnail_is_bounded(small_cohort):
    with Slide(_slide_path(small_cohort)) as slide:
        image, downsample = slide.thumbnail(300)
    assert max(image.shape[:2]) <= 300
    assert downsample == pytest.approx(2048 / 300)


def test_magnification_to_mpp(small_cohort):
    with Slide(_slide_path(small_cohort)) as slide:
        assert slide.mpp_for_magnification(10) == pytest.approx(1.0)
        assert slide.mpp_for_magnification(20) == pytest.approx(0.5)


def _flat(x0, y0, w, h, ds):
    return np.full((h, w, 3), 200, np.uint8)


def test_missing_mpp_is_a_clear_error_and_override_works(tmp_path):
    path = write_pyramid(tmp_path / "nompp.svs", 600, 400, _flat, mpp=None)
    with Slide(path) as slide:
        assert slide.vendor == "aperio"
        with pytest.raises(MissingMppError) as info:
            _ = slide.mpp
        message = str(info.value)
        assert "nompp.svs" in message and "--slide-mpp" in message
    with Slide(path, mpp_override=0.25) as slide:
        assert slide.mpp == 0.25


def test_generic_tiff_takes_mpp_from_resolution_tags(tmp_path):
    path = write_pyramid(tmp_path / "generic.tif", 700, 500, _flat, mpp=0.5, vendor="generic")
    with Slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.mpp == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "absent.svs", "not found"),
        (lambda d: d, "directory"),
        (lambda d: _write(d / "notes.svs", b"this is not a slide"), "not a slide format"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(SlideOpenError) as info:
        Slide(path)
    message = str(info.value)
    assert str(path) in message and words in message and "\n" not in message


def test_truncated_slide_is_an_error_not_a_crash(small_cohort, tmp_path):
    source = _slide_path(small_cohort)
    broken = tmp_path / "broken.svs"
    data = source.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    # opening may succeed; reading the lost tiles must then fail with the file's name
    with pytest.raises((SlideOpenError, SlideReadError)) as info, Slide(broken) as slide:
        slide.read_region((0, 0), 0, slide.dimensions)
    assert "broken.svs" in str(info.value)
    shutil.rmtree(tmp_path, ignore_errors=True)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory):
    return write_flat_tiff(tmp_path_factory.mktemp("flat") / "flat.tif", 6144, 5120)


def test_flat_slide_thumbnail_is_read_block_by_block(flat_slide):
    """A single-level slide's thumbnail comes from level 0 in bounded blocks: the same image as a
    whole-level area downscale, with a fraction of that level's memory."""
    with Slide(flat_slide) as slide:
        assert slide.level_count == 1 and slide.mpp == pytest.approx(0.5, rel=1e-3)
        tracemalloc.start()
        try:
            thumb, downsample = slide.thumbnail(1024)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        whole = slide.read_region((0, 0), 0, slide.dimensions)
    level_bytes = whole.nbytes * 4 // 3  # OpenSlide hands over RGBA
    assert peak < level_bytes / 5, f"peak {peak / 2**20:.0f} MiB: level 0 was read whole"
    assert thumb.shape == (853, 1024, 3) and downsample == pytest.approx(6.0)
    # the whole level shrunk by the same 6x (853 rows cover 5118 of the 5120 px)
    reference = cv2.resize(whole[: 853 * 6], (1024, 853), interpolation=cv2.INTER_AREA)
    difference = np.abs(reference.astype(np.int16) - thumb.astype(np.int16))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) < 12


def test_whole_level_read_in_blocks_is_exact(flat_slide):
    with Slide(flat_slide) as slide:
        assert slide.dimensions[0] > REGION_CHUNK
        plan = slide.plan_for_downsample(1.0)
        region = slide.read_scaled((1000, 700), plan, (2500, 1300))
        assert np.array_equal(region, slide.read_region((1000, 700), 0, (2500, 1300)))
        level = slide.read_level(0)
        assert level.shape == (5120, 6144, 3)
        assert np.array_equal(
            level[3000:3100, 4000:4200], slide.read_region((4000, 3000), 0, (200, 100))
        )


@pytest.mark.parametrize("reader", ["openslide", "tiles"])
def test_slide_reads_through_the_chosen_reader(small_cohort, reader):
    """The same slide through either reader: same geometry and µm/px, same patches (JPEG
    decoders and sub-pixel rounding aside), and OpenSlide's errors as ours."""
    path = _slide_path(small_cohort)
    coords = np.array([[0, 0], [512, 256], [1800, 1500]])
    with Slide(path) as auto, Slide(path, reader=reader) as chosen:
        assert auto.reader_name == "tiles" and chosen.reader_name == reader
        assert chosen.level_dimensions == auto.level_dimensions
        assert chosen.level_downsamples == auto.level_downsamples
        assert chosen.mpp == auto.mpp and chosen.vendor == "aperio"
        ours = chosen.read_patches(coords, 1, 64, 32).astype(np.int16)
        theirs = auto.read_patches(coords, 1, 64, 32).astype(np.int16)
        assert ours.shape == (3, 32, 32, 3) and np.abs(ours - theirs).max() <= 4
        thumb, _ = chosen.thumbnail(256)
        reference, _ = auto.thumbnail(256)
        assert np.abs(thumb.astype(np.int16) - reference).max() <= 4
        with pytest.raises(SlideReadError, match="level 7"):
            chosen.read_region((0, 0), 7, (8, 8))
