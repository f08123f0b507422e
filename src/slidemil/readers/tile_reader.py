"""The raw-tile reader: a tiled TIFF/SVS read tile by tile with tifffile's index and imagecodecs.

OpenSlide spends most of a ``read_region`` call outside the decoder (cairo painting, format
conversion, its locks and cache); reading the stored tiles directly costs one ``pread`` and one
decode per tile, and a small LRU of decoded tiles serves neighbouring patches (only tiles
a region cuts are kept: one wholly inside it is needed by no neighbour, so large reads such as
thumbnails stay bounded in memory).

Geometry matches OpenSlide's (see :mod:`slidemil.readers.tiff_layout`): the region's origin at a
level is ``location / downsample``; when that is not a whole pixel, OpenSlide's cairo paints the
tiles at a sub-pixel offset, i.e. bilinear interpolation between neighbouring pixels, which is
done here too. Pixels outside the image (right and bottom edge tiles are clipped to the image)
are transparent and come back white. A negative location shifts the region the way OpenSlide
does, and regions are painted in blocks of at most 4096 px a side, as OpenSlide paints them.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from slidemil.errors import SlideOpenError, SlideReadError
from slidemil.readers.openslide_reader import OpenSlideReader
from slidemil.readers.pixels import mpp_from_properties, regions_one_by_one
from slidemil.readers.tiff_layout import TiffLayout, TileLevel
from slidemil.readers.tile_codecs import decode_tile

# Decoded tiles kept per reader (bytes): 16 MiB is 85 RGB tiles of 256 px, enough for the tiles a
# row of patches shares with its neighbours; kept small as every reader worker holds one.
DEFAULT_CACHE_BYTES = 16 * 2**20
# Reads of at most this many px (patch-sized: up to 724 px a side) keep the decoded tiles they
# cut for their neighbours; larger reads (thumbnail blocks of 1024 px) keep none.
CACHED_READ_PIXELS = 2**19
# OpenSlide paints a request in blocks of this many px a side (its cairo surfaces' limit).
PAINT_BLOCK = 4096


class TileReader:
    """A tiled TIFF-family slide read from its raw tiles.

    Args:
        layout: the file's pyramid (:func:`~slidemil.readers.tiff_layout.read_tiff_layout`).
        cache_bytes: memory for decoded tiles (bytes); least recently used tiles go first.

    ``properties`` are OpenSlide's (opened on first use, as is OpenSlide for regions that touch a
    tile OpenSlide would paint from another level).
    """

    name = "tiles"

    def __init__(self, layout: TiffLayout, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.path = layout.path
        self.layout = layout
        self.structure = layout.structure
        self._levels = layout.levels
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SlideOpenError(self.path, f"cannot open it: {e.strerror}") from e
        self._cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self._cache_bytes = int(cache_bytes)
        self._cached = 0
        self._openslide: OpenSlideReader | None = None
        self._properties: dict[str, str] | None = None

    # -- geometry and metadata ------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self._levels[0].width, self._levels[0].height

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((level.width, level.height) for level in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.layout.downsamples

    @property
    def properties(self) -> dict[str, str]:
        if self._properties is None:
            self._properties = self._fallback().properties
        return dict(self._properties)

    @property
    def mpp(self) -> float | None:
        return mpp_from_properties(self.properties)

    # -- pixels ---------------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` (w, h) px at ``level`` from level-0 ``location``."""
        level = self._check_level(level)
        x, y = int(location[0]), int(location[1])
        width, height = int(size[0]), int(size[1])
        if width < 0 or height < 0:
            raise SlideReadError(self.path, f"negative region size {size}")
        if self.needs_openslide(level, x, y, width, height):
            return self._fallback().read_region((x, y), level, (width, height))
        if width <= PAINT_BLOCK and height <= PAINT_BLOCK:
            return self._paint(level, (x, y), width, height)
        out = np.full((height, width, 3), 255, np.uint8)
        ds = self.layout.downsamples[level]
        for by in range(0, height, PAINT_BLOCK):
            for bx in range(0, width, PAINT_BLOCK):
                w, h = min(PAINT_BLOCK, width - bx), min(PAINT_BLOCK, height - by)
                origin = (x + int(bx * ds), y + int(by * ds))  # OpenSlide truncates here
                out[by : by + h, bx : bx + w] = self._paint(level, origin, w, h)
        return out

    def read_regions(
        self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (N, h, w, 3); each tile is decoded once for all regions it serves (the
        decoded-tile cache outlives the region that filled it)."""
        return regions_one_by_one(self.read_region, locations, level, size)

    def read_level_region(
        self, level: int, origin: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3): the stored px of ``level`` from level px ``origin``, as they are
        (no resampling); white outside the image."""
        level = self._check_level(level)
        x, y = int(origin[0]), int(origin[1])
        width, height = int(size[0]), int(size[1])
        ds = self.layout.downsamples[level]
        if self.needs_openslide(level, round(x * ds), round(y * ds), width, height):
            return self._fallback().read_level_region(level, (x, y), (width, height))
        rgb, alpha = self._window(level, x, y, width, height)
        if alpha is not None:
            rgb[alpha == 0] = 255
        return rgb

    def level_info(self, level: int) -> TileLevel:
        """The stored layout of ``level`` (tile size, compression, offsets)."""
        return self._levels[self._check_level(level)]

    def raw_tile(self, level: int, index: int) -> bytes:
        """The stored bytes of tile ``index`` (row-major) of ``level``."""
        info = self._levels[level]
        count = int(info.bytecounts[index])
        offset = int(info.offsets[index])
        try:
            data = os.pread(self._fd, count, offset)
        except OSError as e:
            raise SlideReadError(
                self.path, f"cannot read tile {index} of level {level}: {e}"
            ) from e
        if len(data) != count:
            raise SlideReadError(
                self.path,
                f"tile {index} of level {level} ends past the end of the file (truncated copy?)",
            )
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._openslide is not None:
            self._openslide.close()
            self._openslide = None
        self._cache.clear()
        self._cached = 0

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):
        raise TypeError("a TileReader holds an open file; open one per process")

    # -- internals ------------------------------------------------------------------------------
    def _check_level(self, level: int) -> int:
        level = int(level)
        if not 0 <= level < len(self._levels):
            raise SlideReadError(
                self.path, f"level {level} does not exist (the slide has {len(self._levels)})"
            )
        return level

    def _fallback(self) -> OpenSlideReader:
        if self._openslide is None:
            self._openslide = OpenSlideReader(self.path)
        return self._openslide

    def needs_openslide(self, level: int, x: int, y: int, width: int, height: int) -> bool:
        """Whether the region touches a tile that OpenSlide paints from another level."""
        info = self._levels[level]
        if not (self.layout.missing_from_finer and info.missing):
            return False
        ds = self.layout.downsamples[level]
        x0, y0 = max(x, 0) / ds, max(y, 0) / ds
        cols = range(int(x0 // info.tile_width), int((x0 + width) // info.tile_width) + 1)
        rows = range(int(y0 // info.tile_height), int((y0 + height) // info.tile_height) + 1)
        return any(r * info.tiles_across + c in info.missing for r in rows for c in cols)

    def _paint(self, level: int, origin: tuple[int, int], width: int, height: int) -> np.ndarray:
        """RGB (h, w, 3) of one block, as OpenSlide paints it: negative coordinates shift the
        block, a fractional origin at the level interpolates bilinearly."""
        ds = self.layout.downsamples[level]
        x, y = origin
        # OpenSlide: a negative origin moves the painting right/down by whole level px.
        shift_x = int(-x / ds) if x < 0 else 0
        shift_y = int(-y / ds) if y < 0 else 0
        x, y = max(x, 0), max(y, 0)
        w, h = width - shift_x, height - shift_y
        if w <= 0 or h <= 0:
            return np.full((height, width, 3), 255, np.uint8)
        fx, fy = x / ds, y / ds
        ix, iy = math.floor(fx), math.floor(fy)
        fx, fy = fx - ix, fy - iy
        if fx == 0 and fy == 0:
            rgb, alpha = self._window(level, ix, iy, w, h)
            if alpha is not None:
                rgb[alpha == 0] = 255
        else:
            rgb = self._interpolated(level, ix, iy, fx, fy, w, h)
        if shift_x == 0 and shift_y == 0:
            return rgb
        out = np.full((height, width, 3), 255, np.uint8)
        out[shift_y:, shift_x:] = rgb
        return out

    def _interpolated(
        self, level: int, ix: int, iy: int, fx: float, fy: float, w: int, h: int
    ) -> np.ndarray:
        ww, hh = w + (fx > 0), h + (fy > 0)
        rgb, alpha = self._window(level, ix, iy, ww, hh)
        premultiplied = rgb.astype(np.float32)
        a = np.full((hh, ww), 255.0, np.float32) if alpha is None else alpha.astype(np.float32)
        if alpha is not None:
            premultiplied *= (alpha[..., None] > 0).astype(np.float32)
        rgba = np.concatenate([premultiplied, a[..., None]], axis=-1)
        return composite_premultiplied(bilinear(rgba, fx, fy, w, h))

    def _window(
        self, level: int, x0: int, y0: int, w: int, h: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB (h, w, 3) at level px ``[x0, x0+w) x [y0, y0+h)`` and its alpha (255 inside the
        image, 0 outside or in a missing tile), ``None`` when fully opaque."""
        info = self._levels[level]
        tw, th = info.tile_width, info.tile_height
        rgb = np.zeros((h, w, 3), np.uint8)
        vx0, vy0 = max(x0, 0), max(y0, 0)
        vx1, vy1 = min(x0 + w, info.width), min(y0 + h, info.height)
        opaque = (vx0, vy0, vx1, vy1) == (x0, y0, x0 + w, y0 + h)
        alpha = None if opaque else np.zeros((h, w), np.uint8)
        # Patch-sized reads keep the tiles they cut, for their neighbours; a large read (a
        # thumbnail block) keeps none, so its memory stays bounded by the block.
        cacheable = w * h <= CACHED_READ_PIXELS
        for row in range(vy0 // th, (vy1 - 1) // th + 1 if vy1 > vy0 else 0):
            for col in range(vx0 // tw, (vx1 - 1) // tw + 1 if vx1 > vx0 else 0):
                sx0, sy0 = max(vx0, col * tw), max(vy0, row * th)
                sx1, sy1 = min(vx1, (col + 1) * tw), min(vy1, (row + 1) * th)
                # a tile wholly inside the window serves no neighbouring region: not cached
                inside = (sx0, sy0, sx1, sy1) == (
                    col * tw,
                    row * th,
                    (col + 1) * tw,
                    (row + 1) * th,
                )
                keep = cacheable and not inside
                tile = self._tile(level, row * info.tiles_across + col, keep=keep)
                dst = (slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0))
                if tile is None:  # missing tile: transparent
                    if alpha is None:
                        alpha = np.full((h, w), 255, np.uint8)
                    alpha[dst] = 0
                    continue
                rgb[dst] = tile[sy0 - row * th : sy1 - row * th, sx0 - col * tw : sx1 - col * tw]
                if alpha is not None:
                    alpha[dst] = 255
        return rgb, alpha

    def _tile(self, level: int, index: int, keep: bool = True) -> np.ndarray | None:
        key = (level, index)
        cached = self._cache.get(key, False)
        if cached is not False:
            self._cache.move_to_end(key)
            return cached
        info = self._levels[level]
        tile = None
        if index not in info.missing:
            data = self.raw_tile(level, index)
            try:
                tile = decode_tile(info, data)
            except Exception as e:
                raise SlideReadError(
                    self.path, f"cannot decode tile {index} of level {level}: {e}"
                ) from e
        if not keep:
            return tile
        self._cache[key] = tile
        self._cached += 0 if tile is None else tile.nbytes
        while self._cached > self._cache_bytes and len(self._cache) > 1:
            old = self._cache.popitem(last=False)[1]
            self._cached -= 0 if old is None else old.nbytes
        return tile


def bilinear(rgba: np.ndarray, fx: float, fy: float, w: int, h: int) -> np.ndarray:
    """(h, w, 4) float samples of premultiplied ``rgba`` at offsets (fx, fy) in [0, 1) px."""
    top = rgba[:h, :w] * (1 - fx)
    bottom = rgba[1 : h + 1, :w] * (1 - fx) if fy > 0 else None
    if fx > 0:
        top += rgba[:h, 1 : w + 1] * fx
        if bottom is not None:
            bottom += rgba[1 : h + 1, 1 : w + 1] * fx
    if bottom is None:
        return top
    return top * (1 - fy) + bottom * fy


def composite_premultiplied(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 of premultiplied float RGBA (0-255) blended onto white."""
    rgb = rgba[..., :3] + (255.0 - rgba[..., 3:4])
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
