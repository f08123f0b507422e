"""Tissue mask images of every common mode, read with bounded memory.

Which pixels are tissue (stored values count, not the colours a viewer shows):

* 1-bit, grey (8/16/32-bit integers, 0-1 or 0-255 scales): a value above zero. Floating-point
  images (probability maps): a value above 0.5.
* RGB: a pixel that is not black; in an image with no black pixel but some white ones (a label
  colour drawn on white), a pixel that is not white.
* With an alpha channel (RGBA, grey + alpha): when no pixel is fully transparent, alpha is ignored
  and the colour rule applies. Otherwise a transparent pixel is background and, when the visible
  pixels all have one colour (a mask painted in alpha on a transparent canvas), every visible
  pixel is tissue; else a visible pixel is tissue by the colour rule.
* Palette: index 0 is background and any other index is tissue (label images, as QuPath and
  ImageJ write them, whatever colour the background label has); when every colour used is black
  or white (a binary image stored with a palette, in any palette order), white is tissue.
  Transparent palette entries are background.
* JPEG (lossy): "above zero" means above half the range, so compression noise is not tissue.

Large images are never held whole: a TIFF is read at the pyramid level or reduced page nearest
above :data:`MAX_MASK_SIDE` and decoded tile by tile (or strip by strip); JPEG is decoded at a
reduced scale. Each block is classified and summed into a grid at most ``MAX_MASK_SIDE`` px a
side (a cell is tissue when most of its pixels are). PNG and BMP cannot be decoded in parts, so
they are decoded whole up to :data:`MAX_DECODED_BYTES`.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from slidemil.errors import MaskError

# Longer side, px, of the boolean mask handed to patch selection (no finer is needed).
MAX_MASK_SIDE = 4096
# Largest image decoded whole (PNG, BMP, planar TIFF): 256 MiB of pixel data.
MAX_DECODED_BYTES = 2**28
# Rows of a decoded image classified at a time (bounds the temporaries).
BAND_ROWS = 1024
# Fraction of the value range a lossy (JPEG) pixel must exceed to count as "on".
LOSSY_FRACTION = 0.5
# Bytes per band of PIL's decoded modes (8-bit modes are 1).
BYTES_PER_BAND = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2}
SMALLER_FIX = "save it at a downsample of the slide (1/16 is plenty) or as a tiled TIFF"
# Compressed bytes of TIFF tiles or strips read from the file at a time.
SEGMENT_BUFFER = 2**24
# Pages after the first searched for reduced copies of the image in a multi-page TIFF.
MAX_REDUCED_PAGES = 16
TIFF_SUFFIXES = {".tif", ".tiff"}


@dataclass
class Layout:
    """How a mask image stores its pixels.

    ``kind``: ``"grey"`` (one or more value channels), ``"rgb"`` or ``"palette"``; ``alpha``:
    the last channel is alpha; ``threshold``: a value above it is "on"; ``white``: the value of
    full intensity; ``palette``: (n, 3) uint8 colours and ``transparent``: (n,) bool entries of a
    palette image.
    """

    kind: str
    alpha: bool = False
    threshold: float = 0.0
    white: float = 255.0
    palette: np.ndarray | None = None
    transparent: np.ndarray | None = None


@dataclass
class MaskImage:
    """A mask image opened for reading: its size in px and its pixel blocks ``(y, x, array)``."""

    width: int
    height: int
    layout: Layout
    blocks: Iterator[tuple[int, int, np.ndarray]] = field(repr=False)


def read_mask_image(path: Path) -> tuple[np.ndarray, int, tuple[int, int]]:
    """Tissue of the mask image at ``path``: a boolean (h, w) grid, the image px per grid cell
    (an integer >= 1), and the image's (width, height) in px (of the level read)."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return _reduce(path, _open_tiff(path, tif))
        with warnings.catch_warnings():
            # our own limit (MAX_DECODED_BYTES) applies; PIL's hard limit still raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _reduce(path, _open_pil(path, image))
    except Image.DecompressionBombError as e:
        raise MaskError(path, f"mask image is too large to decode whole ({e})", SMALLER_FIX) from e
    except MaskError:
        raise
    # what PIL, tifffile and the codecs raise on a truncated or corrupt file
    except (
        OSError,
        ValueError,
        SyntaxError,
        IndexError,
        KeyError,
        RuntimeError,
        struct.error,
    ) as e:
        raise MaskError(path, f"cannot read the mask image: {e}") from e


# -- readers ------------------------------------------------------------------------------------
def _open_tiff(path: Path, tif: tifffile.TiffFile) -> MaskImage:
    if not tif.series:
        raise MaskError(path, "the TIFF file holds no image")
    page = _tiff_level(tif)
    height, width = int(page.imagelength), int(page.imagewidth)
    samples = int(page.samplesperpixel)
    extra = len(page.extrasamples or ())
    photometric = int(page.photometric)
    lossy = int(page.compression) in (6, 7, 33003, 33005, 34712, 34892)  # JPEG, JPEG 2000
    dtype = np.dtype(page.dtype)
    threshold, white = _value_scale(dtype, lossy)
    if photometric == tifffile.PHOTOMETRIC.PALETTE:
        colormap = np.asarray(page.colormap)
        colours = colormap.T if colormap.max() <= 255 else colormap.T >> 8
        layout = Layout("palette", palette=colours.astype(np.uint8))
    elif photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
        layout = Layout("rgb", alpha=samples > 3, threshold=threshold, white=white)
    elif photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE):
        layout = Layout("grey", alpha=extra > 0 and samples > 1, threshold=threshold, white=white)
    else:
        name = tifffile.PHOTOMETRIC(photometric).name
        raise MaskError(path, f"unsupported TIFF colour space {name}", "save a grey or RGB mask")
    if int(page.planarconfig) == tifffile.PLANARCONFIG.SEPARATE and samples > 1:
        _check_decodable(path, width, height, samples * dtype.itemsize)
        blocks = _bands(np.moveaxis(page.asarray(), 0, -1))
    else:
        blocks = _tiff_segments(page, width, height)
    return MaskImage(width, height, layout, blocks)


def _tiff_level(tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """The smallest pyramid level or reduced page of the first image that still has
    ``MAX_MASK_SIDE`` px on its longer side (the largest one when none has)."""
    first = tif.series[0]
    pages = [level.keyframe for level in first.levels]
    base = pages[0]
    aspect = base.imagewidth / base.imagelength
    if len(pages) == 1:  # reduced images stored as plain pages after the first
        for page in tif.pages[1:MAX_REDUCED_PAGES]:
            if not isinstance(page, tifffile.TiffPage) or page.imagewidth >= base.imagewidth:
                continue
            if abs(page.imagewidth / page.imagelength - aspect) <= 0.02 * aspect:
                pages.append(page)
    pages.sort(key=lambda p: -max(p.imagewidth, p.imagelength))
    chosen = pages[0]
    for page in pages:
        if max(page.imagewidth, page.imagelength) >= MAX_MASK_SIDE:
            chosen = page
    return chosen


def _tiff_segments(page, width: int, height: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Decoded tiles or strips of a contiguous TIFF page, cropped to the image."""
    # one decoder thread: with several, tifffile decodes a whole read buffer of segments at once,
    # and a well-compressed mask inflates to GBs
    for segment, index, _shape in page.segments(maxworkers=1, buffersize=SEGMENT_BUFFER):
        if segment is None:  # a tile the file does not store: background
            continue
        y, x = int(index[2]), int(index[3])
        block = segment[0, : height - y, : width - x]
        yield y, x, block[..., 0] if block.shape[-1] == 1 else block


def _open_pil(path: Path, image: Image.Image) -> MaskImage:
    width, height = image.size
    lossy = image.format == "JPEG"
    if lossy and max(width, height) > MAX_MASK_SIDE:
        # decode at 1/2 .. 1/8 scale in the DCT domain, never below MAX_MASK_SIDE
        factor = max(width, height) / MAX_MASK_SIDE
        image.draft(image.mode, (math.ceil(width / factor), math.ceil(height / factor)))
        width, height = image.size
    if image.mode in ("PA", "RGBa", "La"):
        image = image.convert("RGBA" if image.mode != "La" else "LA")
    elif image.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA", "P"):
        image = image.convert("RGB")
    _check_decodable(path, width, height, BYTES_PER_BAND.get(image.mode, 1) * len(image.getbands()))
    pixels = np.asarray(image)
    if image.mode == "P":
        layout = _palette_layout(image)
    else:
        threshold, white = _value_scale(pixels.dtype, lossy)
        kind = "rgb" if image.mode.startswith("RGB") else "grey"
        layout = Layout(kind, alpha=image.mode in ("LA", "RGBA"), threshold=threshold, white=white)
    return MaskImage(width, height, layout, _bands(pixels))


def _palette_layout(image: Image.Image) -> Layout:
    entries = image.getpalette("RGB") or []
    colours = np.asarray(entries, np.uint8).reshape(-1, 3)
    if len(colours) < 256:  # indices past the palette's end show black
        colours = np.vstack([colours, np.zeros((256 - len(colours), 3), np.uint8)])
    transparent = np.zeros(len(colours), bool)
    value = image.info.get("transparency")
    if isinstance(value, int) and value < len(colours):
        transparent[value] = True
    elif isinstance(value, bytes):
        alphas = np.frombuffer(value, np.uint8)[: len(colours)]
        transparent[: len(alphas)] = alphas == 0
    return Layout("palette", palette=colours, transparent=transparent)


def _value_scale(dtype: np.dtype, lossy: bool) -> tuple[float, float]:
    """(threshold, white) for pixel values of ``dtype``."""
    if np.issubdtype(dtype, np.bool_):
        return 0.0, 1.0
    if np.issubdtype(dtype, np.floating):
        return 0.5, 1.0
    white = float(np.iinfo(dtype).max)
    return (LOSSY_FRACTION * white if lossy else 0.0), white


def _check_decodable(path: Path, width: int, height: int, bytes_per_px: int) -> None:
    if width * height * bytes_per_px > MAX_DECODED_BYTES:
        raise MaskError(
            path,
            f"mask image is {width}x{height} px, too large for a format that is decoded whole "
            f"(over {MAX_DECODED_BYTES // 2**20} MiB)",
            SMALLER_FIX,
        )


def _bands(pixels: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    for y in range(0, pixels.shape[0], BAND_ROWS):
        yield y, 0, pixels[y : y + BAND_ROWS]


# -- classification and reduction ---------------------------------------------------------------
class _Reducer:
    """Sums candidate tissue masks over grid cells of ``factor`` px, with the image-wide facts
    that decide between them at the end (see the module docstring)."""

    def __init__(self, layout: Layout, width: int, height: int, factor: int):
        self.layout = layout
        self.width, self.height, self.factor = width, height, factor
        self.shape = (math.ceil(height / factor), math.ceil(width / factor))
        self.dtype = np.uint16 if factor * factor < 2**16 else np.uint32
        self.grids: dict[str, np.ndarray] = {}
        self.any_transparent = False
        self.any_visible = False
        self.black = 0  # visible pixels that are black / white
        self.white = 0
        self.low: np.ndarray | None = None  # per-channel range of the visible pixels' colour
        self.high: np.ndarray | None = None
        self.used = np.zeros(0, np.int64)  # palette indices' counts

    def add(self, y: int, x: int, block: np.ndarray) -> None:
        for name, on in self._candidates(block).items():
            grid = self.grids.get(name)
            if grid is None:
                grid = self.grids[name] = np.zeros(self.shape, self.dtype)
            self._accumulate(grid, y, x, on)

    def _candidates(self, block: np.ndarray) -> dict[str, np.ndarray]:
        layout = self.layout
        if layout.kind == "palette":
            return self._palette_candidates(block)
        if block.ndim == 2:
            block = block[..., None]
        colour, alpha = (block[..., :-1], block[..., -1]) if layout.alpha else (block, None)
        on = (colour > layout.threshold).any(axis=-1)
        candidates = {"on": on}
        visible = None
        if alpha is not None:
            visible = alpha > 0
            self.any_transparent |= bool((~visible).any())
            self.any_visible |= bool(visible.any())
            if visible.any():
                shown = colour[visible]
                low, high = shown.min(axis=0), shown.max(axis=0)
                self.low = low if self.low is None else np.minimum(self.low, low)
                self.high = high if self.high is None else np.maximum(self.high, high)
            candidates["visible"] = visible
            candidates["on_visible"] = on & visible
        if layout.kind == "rgb":
            not_white = (colour < layout.white - layout.threshold).any(axis=-1)
            candidates["not_white"] = not_white
            counted = ~on if visible is None else ~on & visible
            self.black += int(counted.sum())
            counted = ~not_white if visible is None else ~not_white & visible
            self.white += int(counted.sum())
            if visible is not None:
                candidates["not_white_visible"] = not_white & visible
        return candidates

    def _palette_candidates(self, block: np.ndarray) -> dict[str, np.ndarray]:
        layout = self.layout
        colours, transparent = layout.palette, layout.transparent
        if transparent is None:
            transparent = np.zeros(len(colours), bool)
        index = np.minimum(block.astype(np.intp), len(colours) - 1)
        counts = np.bincount(index.ravel(), minlength=len(colours))
        self.used = counts if self.used.size == 0 else self.used + counts
        labelled = (np.arange(len(colours)) != 0) & ~transparent
        white = (colours == 255).all(axis=1) & ~transparent
        return {"on": labelled[index], "white": white[index]}

    def _accumulate(self, grid: np.ndarray, y: int, x: int, on: np.ndarray) -> None:
        f = self.factor
        if f == 1:
            grid[y : y + on.shape[0], x : x + on.shape[1]] += on
            return
        rows = (y + np.arange(on.shape[0])) // f
        columns = (x + np.arange(on.shape[1])) // f
        row_starts = np.flatnonzero(np.diff(rows, prepend=-1))
        column_starts = np.flatnonzero(np.diff(columns, prepend=-1))
        summed = np.add.reduceat(on.astype(self.dtype), row_starts, axis=0)
        summed = np.add.reduceat(summed, column_starts, axis=1)
        r0, c0 = int(rows[0]), int(columns[0])
        grid[r0 : r0 + summed.shape[0], c0 : c0 + summed.shape[1]] += summed.astype(self.dtype)

    def choice(self) -> str:
        """The candidate that the module docstring's rules pick for this image."""
        layout = self.layout
        if layout.kind == "palette":
            used = np.flatnonzero(self.used)
            shown = [i for i in used if layout.transparent is None or not layout.transparent[i]]
            colours = layout.palette[shown]
            binary = bool(((colours == 0).all(axis=1) | (colours == 255).all(axis=1)).all())
            return "white" if binary and len(shown) else "on"
        alpha_carries_mask = layout.alpha and self.any_transparent and self.any_visible
        if alpha_carries_mask and np.array_equal(self.low, self.high):
            return "visible"
        suffix = "_visible" if alpha_carries_mask else ""
        if layout.kind == "rgb" and self.black == 0 and self.white > 0:
            return "not_white" + suffix
        return "on" + suffix

    def mask(self) -> np.ndarray:
        """Boolean grid: a cell is tissue when at least half of its image px are."""
        counts = self.grids.get(self.choice())
        if counts is None:
            return np.zeros(self.shape, bool)
        f = self.factor
        mask = counts >= math.ceil(f * f / 2)
        # the last row and column of cells may hold fewer image px
        last_h, last_w = self.height - (self.shape[0] - 1) * f, self.width - (self.shape[1] - 1) * f
        columns = np.minimum(f, self.width - np.arange(self.shape[1]) * f)
        rows = np.minimum(f, self.height - np.arange(self.shape[0]) * f)
        mask[-1, :] = 2 * counts[-1, :].astype(np.int64) >= last_h * columns
        mask[:, -1] = 2 * counts[:, -1].astype(np.int64) >= rows * last_w
        return mask


def _reduce(path: Path, image: MaskImage) -> tuple[np.ndarray, int, tuple[int, int]]:
    if image.width <= 0 or image.height <= 0:
        raise MaskError(path, f"mask image is empty ({image.width}x{image.height} px)")
    factor = max(1, math.ceil(max(image.width, image.height) / MAX_MASK_SIDE))
    reducer = _Reducer(image.layout, image.width, image.height, factor)
    for y, x, block in image.blocks:
        if block.ndim not in (2, 3) or block.size == 0:
            continue
        reducer.add(y, x, block)
    return reducer.mask(), factor, (image.width, image.height)
