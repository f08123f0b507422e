"""Readers: the raw-tile reader gives OpenSlide's levels and pixels on files of several writers.

Files are written here the way their writers write them: this project's synthetic SVS, tifffile's
generic tiled pyramidal TIFF (JPEG, LZW, deflate, PackBits, none, with and without predictor),
Aperio-style SVS as Aperio's library writes it (JPEG tiles with shared JPEGTables, RGB-coded;
JPEG 2000 tiles with compression 33003 / 33005, a stripped thumbnail, label and macro) and
libvips ``tiffsave --tile --pyramid`` when vips is installed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile

from slidemil.errors import SlideOpenError, SlideReadError
from slidemil.readers import OpenSlideReader, TileReader, pick_reader
from slidemil.readers.device_decode import (
    can_fetch_jpeg,
    decode_jpeg_patches,
    decode_streams,
    fetch_jpeg_patches,
    resize_patches,
)
from slidemil.readers.tile_codecs import standalone_jpeg

# JPEG decoders (libjpeg-turbo in OpenSlide, imagecodecs and torchvision) may differ by IDCT and
# upsampling details; OpenSlide paints sub-pixel positions with cairo's bilinear filter, whose
# fixed-point rounding differs from ours. Bounds, in levels of 255, documented in docs/slides.md.
SUBPIXEL_MAX_DIFF, SUBPIXEL_MEAN_DIFF = 4, 0.5
JPEG_MAX_DIFF, JPEG_MEAN_DIFF = 4, 0.5


# -- writers --------------------------------------------------------------------------------------
def tissue_like(width: int, height: int, seed: int) -> np.ndarray:
    """RGB uint8 with texture at several scales (so a one-pixel shift shows up in a diff)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for cell, weight in ((64, 120.0), (8, 60.0), (1, 30.0)):
        small = rng.random((max(1, height // cell), max(1, width // cell), 3)).astype(np.float32)
        image += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    image += np.linspace(0, 40, width, dtype=np.float32)[None, :, None]
    return np.clip(image, 0, 255).astype(np.uint8)


def pyramid(image: np.ndarray, downsamples: list[int]) -> list[np.ndarray]:
    height, width = image.shape[:2]
    out = []
    for ds in downsamples:
        size = (math.ceil(width / ds), math.ceil(height / ds))
        out.append(image if ds == 1 else cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    return out


def write_generic_tiff(
    path: Path,
    image: np.ndarray,
    compression: str | None,
    *,
    predictor: bool = False,
    tile: int = 256,
    downsamples: tuple[int, ...] = (1, 2, 4),
) -> Path:
    """A generic tiled pyramidal TIFF as tifffile writes it: reduced levels flagged
    NewSubfileType=1, µm/px in the resolution tags (JPEG: tifffile's YCbCr 2x2)."""
    with tifffile.TiffWriter(path) as tw:
        for index, level in enumerate(pyramid(image, list(downsamples))):
            tw.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                predictor=predictor or None,
                subfiletype=0 if index == 0 else 1,
                resolution=(1e4 / 0.5, 1e4 / 0.5),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


def split_jpeg(stream: bytes) -> tuple[bytes, bytes]:
    """(tables, abbreviated image) of a full JPEG: DQT and DHT segments move to the tables, as
    libtiff's JPEG codec stores them (JPEGTables tag) in the files Aperio's library writes."""
    tables, rest, pos = [], [], 2
    while stream[pos] == 0xFF and stream[pos + 1] != 0xDA:
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        segment = stream[pos : pos + 2 + length]
        (tables if stream[pos + 1] in (0xDB, 0xC4) else rest).append(segment)
        pos += 2 + length
    soi, eoi = b"\xff\xd8", b"\xff\xd9"
    return soi + b"".join(tables) + eoi, soi + b"".join(rest) + stream[pos:]


def without_colour_hints(stream: bytes) -> bytes:
    """The stream without its APP14 (Adobe) segment and with component ids 1, 2, 3: nothing in it
    says RGB (a decoder left to guess takes YCbCr), only the TIFF photometric tag does."""
    out, pos = bytearray(stream[:2]), 2
    renumber = {0x52: 1, 0x47: 2, 0x42: 3}  # 'R', 'G', 'B'
    while True:
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        segment = bytearray(stream[pos : pos + 2 + length])
        if marker == 0xC0:  # SOF0: 3 bytes per component from offset 10
            for i in range(10, len(segment), 3):
                segment[i] = renumber.get(segment[i], segment[i])
        if marker == 0xDA:  # SOS: 2 bytes per component from offset 5
            for i in range(5, 5 + 2 * segment[4], 2):
                segment[i] = renumber.get(segment[i], segment[i])
            out += segment + stream[pos + 2 + length :]
            return bytes(out)
        if marker != 0xEE:
            out += segment
        pos += 2 + length


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """JFIF (full-range BT.601) Y, Cb, Cr planes of an RGB image, uint8 (h, w, 3)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def _tiles_of(level: np.ndarray, tile: int):
    height, width = level.shape[:2]
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            block = level[ty : ty + tile, tx : tx + tile]
            padded = np.empty((tile, tile, 3), np.uint8)
            padded[:] = block[-1:, -1:]  # edge tiles padded with the edge colour, as scanners do
            padded[: block.shape[0], : block.shape[1]] = block
            yield padded


def write_aperio(
    path: Path,
    image: np.ndarray,
    codec: str = "jpeg",
    *,
    tile: int = 240,
    adobe_marker: bool = True,
    mpp: float = 0.25,
    missing_tiles: tuple[int, ...] = (),
) -> Path:
    """An SVS laid out as Aperio's library writes it: tiled level 0, stripped thumbnail, tiled
    levels at downsample 4, then stripped label (NewSubfileType 1) and macro (9) images.

    ``codec``: ``"jpeg"`` (RGB-coded tiles with shared JPEGTables, photometric RGB; with
    ``adobe_marker=False`` nothing in the tiles says RGB), ``"jp2k-ycbcr"`` (33003)
    or ``"jp2k-rgb"`` (33005). ``missing_tiles``: level-0 tile indices written with 0 bytes.
    """
    height, width = image.shape[:2]
    levels = pyramid(image, [1, 4, 16])
    header = "Aperio Image Library v12.0.15 \r\n"
    meta = f"AppMag = 40|MPP = {mpp}|ScanScope ID = SLIDEMIL-TEST"

    def encode(block: np.ndarray) -> bytes:
        if codec == "jpeg":
            return imagecodecs.jpeg8_encode(block, level=80, colorspace="RGB", outcolorspace="RGB")
        if codec == "jp2k-ycbcr":
            return imagecodecs.jpeg2k_encode(
                rgb_to_ycbcr(block), level=40, codecformat="J2K", mct=False
            )
        return imagecodecs.jpeg2k_encode(block, level=40, codecformat="J2K", mct=True)

    compression = {"jpeg": 7, "jp2k-ycbcr": 33003, "jp2k-rgb": 33005}[codec]
    # photometric RGB for RGB-coded JPEG (tifffile would otherwise record YCbCr)
    jpeg_rgb = {"subsampling": (1, 1), "compressionargs": {"outcolorspace": "RGB"}}
    jpeg_rgb = jpeg_rgb if codec == "jpeg" else {}
    with tifffile.TiffWriter(path) as tw:
        for index, level in enumerate(levels):
            streams = [encode(block) for block in _tiles_of(level, tile)]
            tables = None
            if codec == "jpeg":
                parts = [split_jpeg(s) for s in streams]
                tables = parts[0][0]
                if any(t != tables for t, _ in parts):
                    raise ValueError("tiles of one level must share their JPEG tables")
                streams = [s if adobe_marker else without_colour_hints(s) for _, s in parts]
            if index == 0:
                streams = [b"" if i in missing_tiles else s for i, s in enumerate(streams)]
                text = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=80"
            else:
                text = f"{width}x{height} -> {level.shape[1]}x{level.shape[0]} - ({tile}x{tile})"
            tw.write(
                iter(streams),
                shape=level.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                jpegtables=tables,
                **jpeg_rgb,
                description=f"{header}{text}|{meta}",
                subfiletype=0,
                metadata=None,
            )
            if index == 0:
                thumb = cv2.resize(image, (width // 8, height // 8), interpolation=cv2.INTER_AREA)
                tw.write(thumb, description=f"{header}{width}x{height} -> thumb|{meta}",
                         photometric="rgb", metadata=None)  # fmt: skip
        for subfiletype, name in ((1, "label"), (9, "macro")):
            tw.write(
                np.full((64, 96, 3), 200, np.uint8), description=f"{header}{name}",
                photometric="rgb", subfiletype=subfiletype, metadata=None,
            )  # fmt: skip
    return path


def write_vips_pyramid(path: Path, image: np.ndarray, compression: str) -> Path:
    """``vips tiffsave --tile --pyramid`` of ``image`` (what a lab gets converting with libvips)."""
    source = path.with_suffix(".source.tif")
    tifffile.imwrite(source, image, photometric="rgb")
    subprocess.run(
        ["vips", "tiffsave", str(source), str(path), "--tile", "--pyramid",
         "--tile-width", "256", "--tile-height", "256", f"--compression={compression}",
         "--xres", "20", "--yres", "20"],
        check=True, capture_output=True,
    )  # fmt: skip
    source.unlink()
    return path


# -- comparison -----------------------------------------------------------------------------------
def aligned_requests(reader, level: int, rng, n: int = 24):
    """Requests whose origin falls on a whole pixel of ``level``: the grid of patches, plus
    random sizes at random whole-pixel origins reaching over every border."""
    ds = round(reader.level_downsamples[level])
    width, height = reader.level_dimensions[level]
    requests = [((0, 0), (width, height))]  # the whole level, edge tiles included
    requests.append(((-3 * ds, -5 * ds), (64, 48)))  # left and top border
    requests.append((((width - 30) * ds, (height - 20) * ds), (80, 90)))  # right and bottom
    requests.append((((width + 10) * ds, 0), (16, 16)))  # wholly outside
    for _ in range(n):
        x, y = rng.integers(-40, width + 20), rng.integers(-40, height + 20)
        size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
        requests.append(((int(x) * ds, int(y) * ds), size))
    return requests


def any_requests(reader, level: int, rng, n: int = 24):
    """Requests at arbitrary level-0 origins (sub-pixel positions on reduced levels)."""
    width, height = reader.dimensions
    return [
        ((int(rng.integers(-200, width)), int(rng.integers(-200, height))),
         (int(rng.integers(1, 260)), int(rng.integers(1, 260))))
        for _ in range(n)
    ]  # fmt: skip


def differences(path: Path, level: int, requests) -> tuple[int, float]:
    """(max, mean) absolute difference, tile reader vs OpenSlide, over ``requests``."""
    worst, total, count = 0, 0.0, 0
    with pick_reader(path, "tiles") as tiles, OpenSlideReader(path) as reference:
        for location, size in requests:
            ours = tiles.read_region(location, level, size).astype(np.int16)
            theirs = reference.read_region(location, level, size).astype(np.int16)
            assert ours.shape == theirs.shape == (size[1], size[0], 3)
            diff = np.abs(ours - theirs)
            if diff.size:
                worst = max(worst, int(diff.max()))
                total += float(diff.sum())
                count += diff.size
    return worst, total / max(count, 1)


def check_structure(path: Path, structure: str) -> None:
    with pick_reader(path) as tiles, OpenSlideReader(path) as reference:
        assert isinstance(tiles, TileReader)
        assert tiles.structure == structure
        assert tiles.dimensions == reference.dimensions
        assert tiles.level_dimensions == reference.level_dimensions
        assert tiles.level_downsamples == reference.level_downsamples
        assert tiles.mpp == reference.mpp


@pytest.fixture(scope="module")
def image():
    # not a multiple of the tile sizes (edge tiles), levels at exact downsamples 2, 4 (and 4, 16)
    return tissue_like(1008, 784, seed=5)


# -- structure ------------------------------------------------------------------------------------
def test_synthetic_svs_levels_and_pixels_match_openslide(small_cohort):
    path = sorted((small_cohort / "slides").glob("*.svs"))[0]
    check_structure(path, "aperio")
    rng = np.random.default_rng(0)
    with OpenSlideReader(path) as reference:
        level_zero = aligned_requests(reference, 0, rng)
        requests = [any_requests(reference, level, rng) for level in range(2)]
    assert len(requests) == 2  # level 1 is at downsample 3.9965: sub-pixel positions
    assert differences(path, 0, level_zero) == (0, 0.0)
    for level, level_requests in enumerate(requests):
        worst, mean = differences(path, level, level_requests)
        assert worst <= SUBPIXEL_MAX_DIFF and mean <= SUBPIXEL_MEAN_DIFF, (level, worst, mean)


@pytest.mark.parametrize(
    ("compression", "predictor"),
    [(None, False), ("lzw", False), ("lzw", True), ("adobe_deflate", True), ("deflate", False),
     ("packbits", False)],
)  # fmt: skip
def test_lossless_generic_tiff_pixels_equal_openslide(tmp_path, image, compression, predictor):
    path = write_generic_tiff(tmp_path / "slide.tif", image, compression, predictor=predictor)
    if compression == "deflate":  # tifffile writes 8 (Adobe); the old value 32946 reads the same
        with path.open("r+b") as f, tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                tag = page.tags["Compression"]
                f.seek(tag.valueoffset)
                f.write((32946).to_bytes(2, "little"))
        with tifffile.TiffFile(path) as tif:
            assert tif.pages[0].compression == 32946
    check_structure(path, "generic-tiff")
    rng = np.random.default_rng(1)
    with OpenSlideReader(path) as reference:
        for level in range(len(reference.level_dimensions)):
            assert differences(path, level, aligned_requests(reference, level, rng)) == (0, 0.0)
        worst, mean = differences(path, 1, any_requests(reference, 1, rng))
    assert worst <= SUBPIXEL_MAX_DIFF and mean <= SUBPIXEL_MEAN_DIFF


def test_jpeg_generic_tiff_within_bound(tmp_path, image):
    path = write_generic_tiff(tmp_path / "slide.tif", image, "jpeg")
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].photometric == 6  # tifffile: YCbCr, subsampled
    check_structure(path, "generic-tiff")
    rng = np.random.default_rng(2)
    with OpenSlideReader(path) as reference:
        for level in range(len(reference.level_dimensions)):
            worst, mean = differences(path, level, aligned_requests(reference, level, rng))
            assert worst <= JPEG_MAX_DIFF and mean <= JPEG_MEAN_DIFF, (level, worst, mean)


@pytest.mark.parametrize("adobe_marker", [True, False])
def test_aperio_rgb_jpeg_with_shared_tables(tmp_path, image, adobe_marker):
    path = write_aperio(tmp_path / "slide.svs", image, "jpeg", adobe_marker=adobe_marker)
    with tifffile.TiffFile(path) as tif:
        level0 = tif.pages[0]
        assert level0.jpegtables is not None and level0.photometric == 2
        assert [p.is_tiled for p in tif.pages] == [True, False, True, True, False, False]
    check_structure(path, "aperio")
    rng = np.random.default_rng(3)
    with OpenSlideReader(path) as reference:
        for level in range(len(reference.level_dimensions)):
            # RGB-coded tiles read as YCbCr would be off by tens of levels
            worst, mean = differences(path, level, aligned_requests(reference, level, rng))
            assert worst <= JPEG_MAX_DIFF and mean <= JPEG_MEAN_DIFF, (level, worst, mean)
    with pick_reader(path, "tiles") as tiles:
        truth = image[:240, :240].astype(np.int16)
        assert np.abs(tiles.read_region((0, 0), 0, (240, 240)) - truth).mean() < 8


@pytest.mark.parametrize("codec", ["jp2k-ycbcr", "jp2k-rgb"])
def test_aperio_jpeg2000_pixels_equal_openslide(tmp_path, image, codec):
    path = write_aperio(tmp_path / "slide.svs", image, codec)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == {"jp2k-ycbcr": 33003, "jp2k-rgb": 33005}[codec]
    check_structure(path, "aperio")
    rng = np.random.default_rng(4)
    with OpenSlideReader(path) as reference:
        for level in range(len(reference.level_dimensions)):
            assert differences(path, level, aligned_requests(reference, level, rng)) == (0, 0.0)
    with pick_reader(path, "tiles") as tiles:  # the colours are right, not just equal
        truth = image[:240, :240].astype(np.int16)
        assert np.abs(tiles.read_region((0, 0), 0, (240, 240)) - truth).mean() < 8


def test_aperio_missing_tile_is_read_as_openslide_paints_it(tmp_path, image):
    path = write_aperio(tmp_path / "slide.svs", image, "jpeg", missing_tiles=(1,))
    check_structure(path, "aperio")
    with pick_reader(path, "tiles") as tiles, OpenSlideReader(path) as reference:
        for location in [(240, 0), (200, 10), (0, 0), (480, 240)]:
            ours = tiles.read_region(location, 0, (120, 120)).astype(np.int16)
            theirs = reference.read_region(location, 0, (120, 120)).astype(np.int16)
            assert np.abs(ours - theirs).max() <= JPEG_MAX_DIFF


@pytest.mark.skipif(shutil.which("vips") is None, reason="libvips-tools (vips) not installed")
@pytest.mark.parametrize("compression", ["jpeg", "deflate", "none"])
def test_libvips_pyramid(tmp_path, image, compression):
    path = write_vips_pyramid(tmp_path / "slide.tif", image, compression)
    check_structure(path, "generic-tiff")
    rng = np.random.default_rng(5)
    with OpenSlideReader(path) as reference:
        for level in range(len(reference.level_dimensions)):
            worst, mean = differences(path, level, aligned_requests(reference, level, rng))
            if compression == "jpeg":
                assert worst <= JPEG_MAX_DIFF and mean <= JPEG_MEAN_DIFF, (level, worst, mean)
            else:
                assert (worst, mean) == (0, 0.0), level


# -- choosing a reader, errors -------------------------------------------------------------------
def test_auto_falls_back_to_openslide_and_tiles_refuses(tmp_path, image):
    flat = tmp_path / "flat.tif"  # stripped, not tiled: OpenSlide's, not ours
    tifffile.imwrite(flat, image, photometric="rgb")
    with pytest.raises(SlideOpenError, match="OpenSlide"):
        pick_reader(flat)  # not even OpenSlide reads a stripped TIFF
    jp2k = write_generic_tiff(tmp_path / "j.tif", image, "jpeg")
    assert pick_reader(jp2k).name == "tiles"
    with pick_reader(jp2k, "openslide") as reader:
        assert reader.name == "openslide" and reader.structure == "generic-tiff"
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    with pytest.raises(SlideOpenError):
        pick_reader(text)
    with pytest.raises(SlideOpenError, match="tile reader"):
        pick_reader(text, "tiles")
    with pytest.raises(ValueError, match="reader must be"):
        pick_reader(jp2k, "fast")


def test_corrupt_tile_is_a_read_error_naming_the_file(tmp_path, image):
    path = write_generic_tiff(tmp_path / "slide.tif", image, "lzw")
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[1])
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 64)
    with pick_reader(path, "tiles") as tiles:
        tiles.read_region((0, 0), 0, (32, 32))  # other tiles still read
        with pytest.raises(SlideReadError, match=r"slide\.tif.*tile 1 of level 0"):
            tiles.read_region((256, 0), 0, (32, 32))
        with pytest.raises(SlideReadError, match="level 9"):
            tiles.read_region((0, 0), 9, (32, 32))


def test_batched_read_equals_single_reads_and_decodes_each_tile_once(tmp_path, image):
    path = write_generic_tiff(tmp_path / "slide.tif", image, "jpeg")
    locations = [(x, y) for y in range(0, 700, 128) for x in range(0, 900, 128)]
    with pick_reader(path, "tiles") as tiles:
        batch = tiles.read_regions(locations, 0, (128, 128))
        decoded = len(tiles._cache)
        for row, location in enumerate(locations):
            assert np.array_equal(batch[row], tiles.read_region(location, 0, (128, 128)))
    assert decoded == 4 * 3  # the 256 px tiles under the patches, each decoded once
    with OpenSlideReader(path) as reference:
        theirs = reference.read_regions(locations, 0, (128, 128)).astype(np.int16)
    assert np.abs(batch - theirs).max() <= JPEG_MAX_DIFF


# -- the device decode path (run on the CPU here) ------------------------------------------------
@pytest.mark.parametrize("writer", ["synthetic", "aperio-rgb", "aperio-rgb-no-marker"])
def test_device_path_matches_the_tile_reader(tmp_path, image, small_cohort, writer):
    if writer == "synthetic":
        path = sorted((small_cohort / "slides").glob("*.svs"))[1]
    else:
        path = write_aperio(tmp_path / "s.svs", image, adobe_marker=writer == "aperio-rgb")
    rng = np.random.default_rng(6)
    with pick_reader(path, "tiles") as tiles:
        for level in range(len(tiles.level_dimensions)):
            assert can_fetch_jpeg(tiles, level)
            width, height = tiles.dimensions
            locations = [(int(rng.integers(-50, width)), int(rng.integers(-50, height)))
                         for _ in range(12)]  # fmt: skip
            locations.append((0, 0))
            batch = fetch_jpeg_patches(tiles, locations, level, (100, 70))
            assert batch.streams and all(s[:2].tobytes() == b"\xff\xd8" for s in batch.streams)
            on_cpu = tiles.read_regions(locations, level, (100, 70)).astype(np.int16)
            placed = {}
            for placement in ("gather", "slices"):  # CUDA's way and the CPU's way
                on_device = decode_jpeg_patches(batch, "cpu", placement).numpy().astype(np.int16)
                assert on_device.shape == (len(locations), 70, 100, 3)
                diff = np.abs(on_device - on_cpu)
                assert diff.max() <= JPEG_MAX_DIFF and diff.mean() <= JPEG_MEAN_DIFF, level
                placed[placement] = on_device
            assert np.array_equal(placed["gather"], placed["slices"])


def test_device_decode_falls_back_per_tile(tmp_path, image):
    path = write_aperio(tmp_path / "s.svs", image)
    with pick_reader(path, "tiles") as tiles:
        info = tiles.level_info(0)
        good = np.frombuffer(standalone_jpeg(info, tiles.raw_tile(0, 0)), np.uint8)
        broken = good.copy()
        broken[-200:-2] = 0  # a truncated scan: some decoders refuse it, none may crash
        tiles_out = decode_streams([good, broken, good], "RGB", (240, 240), "cpu")
    assert tiles_out.shape == (3, 240, 240, 3)
    assert np.array_equal(tiles_out[0].numpy(), tiles_out[2].numpy())
    assert np.abs(tiles_out[0].numpy().astype(np.int16) - image[:240, :240]).mean() < 8


def test_resize_patches_shrinks_like_area_averaging():
    import torch

    images = torch.from_numpy(np.stack([tissue_like(224, 224, seed=s) for s in range(2)]))
    small = resize_patches(images, 112).numpy().astype(np.int16)
    expected = np.stack([cv2.resize(i, (112, 112), interpolation=cv2.INTER_AREA)
                         for i in images.numpy()]).astype(np.int16)  # fmt: skip
    assert np.abs(small - expected).max() <= 1
    assert resize_patches(images, 224) is images


def test_standalone_stream_declares_the_tiff_colour_space(tmp_path, image):
    import torch
    from torchvision.io import decode_jpeg

    path = write_aperio(tmp_path / "s.svs", image, adobe_marker=False)  # only the tag says RGB
    with pick_reader(path, "tiles") as tiles, OpenSlideReader(path) as reference:
        info, raw = tiles.level_info(0), tiles.raw_tile(0, 0)
        theirs = reference.read_region((0, 0), 0, (240, 240)).astype(np.int16)
    naive = info.jpeg_tables[:-2] + raw[2:]  # tables spliced in, nothing else
    stream = standalone_jpeg(info, raw)
    decoded = {
        name: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        .permute(1, 2, 0)
        .numpy()
        .astype(np.int16)
        for name, data in (("naive", naive), ("standalone", stream))
    }
    assert np.abs(decoded["naive"] - theirs).mean() > 20  # guessed YCbCr: wrong colours
    assert np.abs(decoded["standalone"] - theirs).max() <= JPEG_MAX_DIFF


def test_read_patches_resizes_each_read_like_opencv(tmp_path, image):
    from slidemil.readers.patches import read_patches

    path = write_generic_tiff(tmp_path / "slide.tif", image, "lzw")
    coords = np.array([[0, 0], [300, 200], [900, 700]])  # the last one crosses the border
    with pick_reader(path) as reader:
        shrunk = read_patches(reader, coords, 0, 200, 100)
        grown = read_patches(reader, coords, 1, 50, 100)
        same = read_patches(reader, coords, 0, 64, 64)
        assert shrunk.shape == grown.shape == (3, 100, 100, 3)
        for row, (x, y) in enumerate(coords):
            region = reader.read_region((x, y), 0, (200, 200))
            expected = cv2.resize(region, (100, 100), interpolation=cv2.INTER_AREA)
            assert np.array_equal(shrunk[row], expected)
            small = reader.read_region((x, y), 1, (50, 50))
            expected = cv2.resize(small, (100, 100), interpolation=cv2.INTER_LINEAR)
            assert np.array_equal(grown[row], expected)
            assert np.array_equal(same[row], reader.read_region((x, y), 0, (64, 64)))


def test_whole_level_reads_return_the_stored_pixels_on_odd_downsamples(tmp_path):
    """A level of an odd-sized slide has a downsample that is not a whole number (2501 px ->
    1251: 1.9992); reading all of it block by block must give its stored px, as a segmentation
    image should, not blocks resampled by the fraction of a px their level-0 origins fall at."""
    from slidemil.slide import REGION_CHUNK, Slide

    picture = tissue_like(2501, 1301, seed=3)
    path = write_generic_tiff(tmp_path / "odd.tif", picture, "zlib", downsamples=(1, 2))
    stored = tifffile.imread(path, series=0, level=1)
    assert stored.shape[1] > REGION_CHUNK  # read in more than one block
    with Slide(path, reader="tiles") as slide:
        assert slide.level_downsamples[1] % 1 != 0
        assert np.array_equal(slide.read_level(1), stored)
    with Slide(path, reader="openslide") as slide:  # nearest level-0 origin: within a px
        difference = np.abs(slide.read_level(1).astype(int) - stored)
        assert difference.mean() < SUBPIXEL_MEAN_DIFF
