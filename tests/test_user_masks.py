"""User mask images in every common mode, written the way the usual tools write them (PIL as GIMP
and QuPath exports look, OpenCV, tifffile as ImageJ writes), and large masks read reduced."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from slidemil.errors import MaskError
from slidemil.tissue import load_user_mask
from slidemil.tissue import mask_image as mask_image_module

SLIDE = (4000, 3000)  # level-0 px of the slide the 400 x 300 px masks belong to (1/10)
SHAPE = (300, 400)


def _truth() -> np.ndarray:
    """The tissue every mask below encodes: a rectangle and a disc."""
    truth = np.zeros(SHAPE, bool)
    truth[40:140, 50:200] = True
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    truth |= (yy - 200) ** 2 + (xx - 300) ** 2 < 60**2
    return truth


def _check(path, truth=None):
    truth = _truth() if truth is None else truth
    tissue = load_user_mask(path, SLIDE)
    assert tissue.mask.shape == truth.shape
    assert tissue.downsample == pytest.approx(10.0)
    wrong = np.mean(tissue.mask != truth)
    assert wrong < 0.002, f"{path.name}: {wrong:.1%} of pixels misread"
    return tissue


def _rgba(truth, tissue_rgba, background_rgba) -> np.ndarray:
    image = np.empty((*truth.shape, 4), np.uint8)
    image[:] = background_rgba
    image[truth] = tissue_rgba
    return image


def test_one_bit_png_and_tiff(tmp_path):
    truth = _truth()
    Image.fromarray(truth).save(tmp_path / "gimp_1bit.png")  # mode "1"
    assert Image.open(tmp_path / "gimp_1bit.png").mode == "1"
    _check(tmp_path / "gimp_1bit.png")
    tifffile.imwrite(tmp_path / "bool.tif", truth, compression="deflate")  # 1-bit, MinIsWhite
    _check(tmp_path / "bool.tif")


@pytest.mark.parametrize("on_value", [1, 255])
def test_grey_masks_on_either_scale(tmp_path, on_value):
    grey = _truth().astype(np.uint8) * on_value
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    _check(tmp_path / "grey.png")


def test_sixteen_bit_grey_png_and_tiff(tmp_path):
    grey = _truth().astype(np.uint16) * 65535
    cv2.imwrite(str(tmp_path / "grey16.png"), grey)
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    _check(tmp_path / "grey16.png")
    tifffile.imwrite(tmp_path / "grey16.tif", _truth().astype(np.uint16) * 3)
    _check(tmp_path / "grey16.tif")


def test_imagej_binary_masks(tmp_path):
    """ImageJ writes 8-bit 0/255 masks; with an inverted LUT it stores MinIsWhite, where the
    stored 255 (shown black) is the object."""
    grey = _truth().astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "imagej.tif", grey, imagej=True)
    _check(tmp_path / "imagej.tif")
    tifffile.imwrite(tmp_path / "inverted_lut.tif", grey, photometric="miniswhite")
    _check(tmp_path / "inverted_lut.tif")


def test_probability_map_tiff(tmp_path):
    truth = _truth()
    probability = np.where(truth, 0.9, 0.1).astype(np.float32)
    tifffile.imwrite(tmp_path / "probability.tif", probability)
    _check(tmp_path / "probability.tif")


def test_rgb_masks_black_or_white_background(tmp_path):
    truth = _truth()
    bgr = np.zeros((*SHAPE, 3), np.uint8)
    bgr[truth] = (255, 255, 255)
    cv2.imwrite(str(tmp_path / "opencv_rgb.png"), bgr)
    _check(tmp_path / "opencv_rgb.png")
    # a label colour drawn on white (no black pixel anywhere): white is the background
    rgb = np.full((*SHAPE, 3), 255, np.uint8)
    rgb[truth] = (200, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "label_on_white.png")
    _check(tmp_path / "label_on_white.png")


def test_opaque_rgba_uses_colour_not_alpha(tmp_path):
    """An RGBA mask saved opaque (alpha 255 everywhere) is read by its colour: taking the alpha
    channel for tissue made the whole slide tissue."""
    image = _rgba(_truth(), (255, 255, 255, 255), (0, 0, 0, 255))
    Image.fromarray(image, "RGBA").save(tmp_path / "opaque.png")
    _check(tmp_path / "opaque.png")
    bgra = image[..., [2, 1, 0, 3]]
    cv2.imwrite(str(tmp_path / "opencv_bgra.png"), bgra)
    _check(tmp_path / "opencv_bgra.png")
    tifffile.imwrite(tmp_path / "opaque.tif", image, photometric="rgb", extrasamples=["unassalpha"])
    _check(tmp_path / "opaque.tif")


def test_mask_painted_in_alpha_on_transparent_canvas(tmp_path):
    """GIMP: a black brush on a transparent layer; only alpha says where the tissue is."""
    image = _rgba(_truth(), (0, 0, 0, 255), (0, 0, 0, 0))
    Image.fromarray(image, "RGBA").save(tmp_path / "alpha_only.png")
    _check(tmp_path / "alpha_only.png")
    white_canvas = _rgba(_truth(), (255, 255, 255, 255), (255, 255, 255, 0))
    Image.fromarray(white_canvas, "RGBA").save(tmp_path / "white_brush.png")
    _check(tmp_path / "white_brush.png")


def test_rgba_with_transparency_and_colours(tmp_path):
    """Visible black is background, transparent is background, visible colour is tissue."""
    truth = _truth()
    image = _rgba(truth, (0, 200, 0, 255), (255, 255, 255, 0))
    image[250:, :100] = (0, 0, 0, 255)  # an opaque black corner: not tissue
    Image.fromarray(image, "RGBA").save(tmp_path / "mixed.png")
    _check(tmp_path / "mixed.png")


def test_grey_plus_alpha(tmp_path):
    truth = _truth()
    la = np.zeros((*SHAPE, 2), np.uint8)
    la[..., 0] = truth * 255
    la[..., 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la_opaque.png")
    _check(tmp_path / "la_opaque.png")
    la[..., 0] = 0
    la[..., 1] = truth * 255
    Image.fromarray(la, "LA").save(tmp_path / "la_alpha.png")
    _check(tmp_path / "la_alpha.png")


def _palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([c for colour in colours for c in colour])
    return image


def test_palette_label_mask_with_white_background_label(tmp_path):
    """QuPath-style label export: background label 0 shown white, classes 1 and 2 coloured."""
    truth = _truth()
    labels = np.zeros(SHAPE, np.uint8)
    labels[truth] = 1
    labels[truth & (np.arange(SHAPE[1])[None, :] > 300)] = 2
    _palette_image(labels, [(255, 255, 255), (200, 0, 0), (0, 150, 0)]).save(tmp_path / "qp.png")
    assert Image.open(tmp_path / "qp.png").mode == "P"
    _check(tmp_path / "qp.png")
    _palette_image(labels, [(255, 255, 255), (200, 0, 0), (0, 150, 0)]).save(tmp_path / "qp.tif")
    _check(tmp_path / "qp.tif")


def test_binary_palette_in_any_order_and_transparent_entry(tmp_path):
    truth = _truth()
    # a black/white image whose palette lists white first: white is still the tissue
    indices = np.where(truth, 0, 1)
    _palette_image(indices, [(255, 255, 255), (0, 0, 0)]).save(tmp_path / "bw.png")
    _check(tmp_path / "bw.png")
    # a transparent palette entry (tRNS) is background even at a non-zero index
    indices = np.where(truth, 1, 2)
    image = _palette_image(indices, [(0, 0, 0), (0, 0, 255), (255, 0, 0)])
    image.save(tmp_path / "trns.png", transparency=2)
    _check(tmp_path / "trns.png")


def test_jpeg_mask_noise_is_not_tissue(tmp_path):
    grey = _truth().astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "mask.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 60])
    decoded = cv2.imread(str(tmp_path / "mask.jpg"), cv2.IMREAD_GRAYSCALE)
    assert ((decoded > 0) & ~_truth()).mean() > 0.002, "the test needs JPEG noise"
    _check(tmp_path / "mask.jpg")


def _blocks_truth(width: int, height: int, cell: int) -> np.ndarray:
    """A checker of ``cell``-px squares (tissue where both block indices are even), as bools."""
    yy = (np.arange(height) // cell) % 2 == 0
    xx = (np.arange(width) // cell) % 2 == 0
    return yy[:, None] & xx[None, :]


def test_pyramidal_tiff_mask_is_read_at_a_reduced_level(tmp_path):
    """A pyramidal mask is read at its smallest level with at least MAX_MASK_SIDE px: the level
    0 here is deliberately different, so reading it would give another mask."""
    base = (12288, 9216)  # width, height of level 0
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        options = {"tile": (512, 512), "compression": "deflate", "photometric": "minisblack"}
        tif.write(np.zeros(base[::-1], np.uint8), subifds=2, **options)  # level 0: nothing
        half = _blocks_truth(base[0] // 2, base[1] // 2, 512).astype(np.uint8) * 255
        tif.write(half, subfiletype=1, **options)  # 6144 px: the level to read
        tif.write(half[::2, ::2], subfiletype=1, **options)  # 3072 px: too coarse
    tissue = load_user_mask(path, (base[0] * 4, base[1] * 4))
    factor = 2  # 6144 px reduced to at most 4096
    assert tissue.mask.shape == (base[1] // 2 // factor, base[0] // 2 // factor)
    expected = _blocks_truth(base[0] // 4, base[1] // 4, 256)
    assert np.array_equal(tissue.mask, expected)
    assert tissue.downsample == pytest.approx(8.0 * factor)


def test_flat_tiled_tiff_mask_is_reduced_tile_by_tile(tmp_path):
    """A full-resolution single-level mask is summed tile by tile, never decoded whole."""
    width, height = 20480, 10240
    path = tmp_path / "flat_mask.tif"
    truth = _blocks_truth(width, height, 1024)

    def tiles():
        for y in range(0, height, 1024):
            for x in range(0, width, 1024):
                yield truth[y : y + 1024, x : x + 1024].astype(np.uint8) * 255

    tifffile.imwrite(
        path, tiles(), shape=(height, width), dtype=np.uint8, tile=(1024, 1024),
        compression="deflate", photometric="minisblack",
    )  # fmt: skip
    tracemalloc.start()
    try:
        tissue = load_user_mask(path, (width * 2, height * 2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < width * height / 4, f"peak {peak / 2**20:.0f} MiB: the mask was read whole"
    factor = 5  # ceil(20480 / 4096)
    assert tissue.mask.shape == (height // factor, width // factor)
    assert tissue.downsample == pytest.approx(2.0 * factor)
    expected = _blocks_truth(width, height, 1024)[::factor, ::factor]
    assert np.mean(tissue.mask != expected) < 0.01


def test_large_jpeg_mask_is_decoded_reduced(tmp_path):
    width, height = 9000, 6000
    grey = _blocks_truth(width, height, 1000).astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "big.jpg"), grey)
    tissue = load_user_mask(tmp_path / "big.jpg", (width * 2, height * 2))
    # decoded at 1/2 in the DCT domain (4500 px, the scale nearest above 4096 px), then 2 px a cell
    assert tissue.mask.shape == (height // 4, width // 4)
    assert tissue.downsample == pytest.approx(8.0)
    expected = _blocks_truth(width // 4, height // 4, 250)
    assert np.mean(tissue.mask != expected) < 0.01


def test_png_too_large_to_decode_is_a_clear_error(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "huge.png"), _truth().astype(np.uint8) * 255)
    monkeypatch.setattr(mask_image_module, "MAX_DECODED_BYTES", 10_000)
    with pytest.raises(MaskError, match=r"huge\.png.*400x300 px, too large.*tiled TIFF"):
        load_user_mask(tmp_path / "huge.png", SLIDE)


def test_corrupt_mask_image_is_a_mask_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(MaskError, match=r"broken\.png"):
        load_user_mask(tmp_path / "broken.png", SLIDE)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 40)
    with pytest.raises(MaskError, match=r"broken\.tif"):
        load_user_mask(tmp_path / "broken.tif", SLIDE)
