"""Deep-zoom tiles of a slide and of its attention, cut on the fly.

The pyramid's geometry (levels, tiles, overlap, the DZI descriptor) is OpenSlide's Deep Zoom
generator's; its pixels are read through :class:`~slidemil.slide.Slide` (the raw-tile reader
where the file allows, OpenSlide otherwise), from the pyramid level nearest each deep-zoom level
and block by block, so a low zoom level of a flat (single-level) slide never needs the whole
level in memory. The attention and patch-grid layers use the same pyramid (same level-0 size,
tile size and overlap), so OpenSeadragon lays them exactly over the slide. A deep-zoom level
``z`` of a pyramid with ``Z`` levels has pixels of ``2 ** (Z - 1 - z)`` level-0 px, which is how
OpenSeadragon places every tile; the overlay tiles are drawn from that geometry with the
heat-map functions (``slidemil.heatmaps``), so the viewer shows what ``slidemil heatmap`` draws.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from slidemil.errors import ArtifactError
from slidemil.formats.attention_file import AttentionMap
from slidemil.heatmaps.export import heat_grid, sample_grid
from slidemil.heatmaps.render import colorize, normalise_scores
from slidemil.slide import Slide

TILE_OVERLAP = 1  # px each side, so tiles blend without seams
JPEG_QUALITY = 85
MEAN_MAP = "mean"
# The patch grid is drawn only where a patch is at least this wide on screen (else it is a blur).
GRID_MIN_PATCH_PX = 6
GRID_RGBA = (20, 20, 20, 200)
CLASS_MAP_PREFIX = "class:"  # map names of per-class scores: class:<class name>
KEPT_GRIDS = 2  # heat grids kept per slide (the maps last shown)


class TileCache:
    """A thread-safe least-recently-used cache of encoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_make(self, key: tuple, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        data = make()  # outside the lock: tiles of other requests are cut meanwhile
        if len(data) > self.max_bytes:
            return data
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)
        return data

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class TileBox:
    """Where a deep-zoom tile lies: level-0 top-left, size in px, level-0 px per tile px."""

    x0: float
    y0: float
    width: int
    height: int
    downsample: float


class SlidePyramid:
    """A slide as a deep-zoom pyramid (``limit_bounds`` off, so deep-zoom coordinates are the
    slide's level-0 coordinates scaled by powers of two)."""

    def __init__(
        self,
        path: str | Path,
        tile_size: int,
        mpp_override: float | None = None,
        reader: str = "auto",
    ):
        # pixels come from the chosen reader; OpenSlide's generator gives the tile geometry
        self.slide = Slide(path, mpp_override=mpp_override, reader=reader)  # clear errors
        self.mpp = self.slide.mpp_or_none
        self.dimensions = self.slide.dimensions
        self.path = Path(path)
        self.tile_size = tile_size
        self._osr = openslide.OpenSlide(str(path))
        self.generator = DeepZoomGenerator(
            self._osr, tile_size=tile_size, overlap=TILE_OVERLAP, limit_bounds=False
        )

    @property
    def level_count(self) -> int:
        return self.generator.level_count

    def dzi(self, image_format: str) -> str:
        """The Deep Zoom descriptor (XML) of this pyramid with tiles in ``image_format``."""
        return self.generator.get_dzi(image_format)

    def check_tile(self, level: int, column: int, row: int) -> None:
        """:class:`IndexError` when the pyramid has no such tile."""
        if not 0 <= level < self.level_count:
            raise IndexError(f"no deep-zoom level {level} (0 to {self.level_count - 1})")
        columns, rows = self.generator.level_tiles[level]
        if not (0 <= column < columns and 0 <= row < rows):
            raise IndexError(f"no tile {column}_{row} at level {level} ({columns}x{rows} tiles)")

    def tile_box(self, level: int, column: int, row: int) -> TileBox:
        """Level-0 geometry of a tile, with the overlap the generator adds at inner edges."""
        self.check_tile(level, column, row)
        downsample = float(2 ** (self.level_count - 1 - level))
        width, height = self.generator.get_tile_dimensions(level, (column, row))
        x = column * self.tile_size - (TILE_OVERLAP if column > 0 else 0)
        y = row * self.tile_size - (TILE_OVERLAP if row > 0 else 0)
        return TileBox(x * downsample, y * downsample, width, height, downsample)

    def tile_jpeg(self, level: int, column: int, row: int) -> bytes:
        box = self.tile_box(level, column, row)
        plan = self.slide.plan_for_downsample(box.downsample)
        origin = (round(box.x0), round(box.y0))
        pixels = self.slide.read_scaled(origin, plan, (box.width, box.height))
        return encode(Image.fromarray(pixels), "jpeg")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]):
        """RGB array of ``size`` px at ``level`` (see :meth:`slidemil.slide.Slide.read_region`)."""
        return self.slide.read_region(location, level, size)


class AttentionLayers:
    """A slide's attention as tile layers: one heat map per map name (``mean`` over the models,
    one model's column, or ``class:<name>``, a class's scores averaged over the models, where the
    file's per-class scores are class-specific), drawn with the heat maps' normalisation, colour
    map and smoothing."""

    def __init__(
        self,
        attention: AttentionMap,
        normalisation: str = "rank",
        cmap: str = "jet",
        smooth_patches: float = 0.0,
    ):
        self.attention = attention
        self.normalisation, self.cmap, self.smooth_patches = normalisation, cmap, smooth_patches
        models = [str(m) for m in attention.attrs.get("models") or []]
        if len(models) != attention.attention.shape[1]:
            models = [f"model_{i}" for i in range(attention.attention.shape[1])]
        self.models = models
        self._grids: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def class_maps(self) -> list[str]:
        """``class:<name>`` for each class when the file's per-class scores differ by class
        (``slidemil predict --explain ig``, or a model with per-class attention)."""
        if not self.attention.class_specific:
            return []
        return [f"{CLASS_MAP_PREFIX}{name}" for name in self.attention.class_names]

    @property
    def map_names(self) -> list[str]:
        """``mean`` first, then each model's column when there are several, then the classes'."""
        models = self.models if len(self.models) > 1 else []
        return [MEAN_MAP, *models, *self.class_maps]

    def scores(self, name: str) -> np.ndarray:
        """(N,) scores of map ``name``: the softmax weights, as the heat maps draw them, or a
        class's scores (mean over the models)."""
        if name == MEAN_MAP:
            return self.attention.mean_attention()
        if name in self.class_maps:
            return self.attention.class_score(name.removeprefix(CLASS_MAP_PREFIX))
        if name not in self.models:
            raise KeyError(f"no attention map {name!r}; there are {', '.join(self.map_names)}")
        return self.attention.attention[:, self.models.index(name)]

    def shown(self, name: str) -> np.ndarray:
        """(N,) scores of map ``name`` normalised to [0, 1]: the colours on screen."""
        return normalise_scores(self.scores(name), self.normalisation)

    def grid(self, name: str, slide_dimensions: tuple[int, int]) -> tuple[np.ndarray, float]:
        """The whole-slide heat grid of map ``name`` and its cell size in level-0 px (at most
        ``KEPT_GRIDS`` are kept: each may take up to 64 MB)."""
        with self._lock:
            if name not in self._grids:
                attention = self.attention
                self._grids[name] = heat_grid(
                    attention.coords,
                    self.shown(name),
                    attention.patch_size_level0,
                    slide_dimensions,
                    self.smooth_patches,
                )
                while len(self._grids) > KEPT_GRIDS:
                    self._grids.popitem(last=False)
            self._grids.move_to_end(name)
            return self._grids[name]

    def heat_tile(self, name: str, box: TileBox, slide_dimensions: tuple[int, int]) -> bytes:
        """RGBA PNG of map ``name`` over ``box``: transparent where no patch lies."""
        grid, cell = self.grid(name, slide_dimensions)
        values = sample_grid(grid, cell, box.x0, box.y0, (box.width, box.height), box.downsample)
        if not np.isfinite(values).any():
            return EMPTY_PNG
        return encode(Image.fromarray(colorize(values, self.cmap), "RGBA"), "png")

    def grid_tile(self, box: TileBox) -> bytes:
        """RGBA PNG of the outlines of the patches that cross ``box`` (transparent when the
        patches are too small on screen to be told apart)."""
        size0 = self.attention.patch_size_level0
        if size0 / box.downsample < GRID_MIN_PATCH_PX:
            return EMPTY_PNG
        coords = self.attention.coords.astype(np.float64)
        x1, y1 = box.x0 + box.width * box.downsample, box.y0 + box.height * box.downsample
        near = (coords[:, 0] < x1) & (coords[:, 0] + size0 > box.x0)
        near &= (coords[:, 1] < y1) & (coords[:, 1] + size0 > box.y0)
        if not near.any():
            return EMPTY_PNG
        # tile pixels whose centres lie inside each footprint (as the heat map places patches);
        # OpenCV clips the edges that fall outside the tile
        local = (coords[near] - (box.x0, box.y0)) / box.downsample
        first = np.ceil(local - 0.5).astype(np.int64)
        last = np.ceil(local + size0 / box.downsample - 0.5).astype(np.int64) - 1
        canvas = np.zeros((box.height, box.width, 4), np.uint8)
        for (left, top), (right, bottom) in zip(first, last, strict=True):
            cv2.rectangle(canvas, (int(left), int(top)), (int(right), int(bottom)), GRID_RGBA, 1)
        return encode(Image.fromarray(canvas, "RGBA"), "png")

    def extremes(self, name: str, k: int) -> dict[str, list[dict]]:
        """The ``k`` highest- and lowest-scoring patches of map ``name`` (index, level-0 x, y,
        score, shown score)."""
        scores, shown = self.scores(name), self.shown(name)
        order = np.argsort(-scores, kind="stable")
        k = min(k, len(order))

        def entries(indices) -> list[dict]:
            return [
                {
                    "index": int(i),
                    "x": int(self.attention.coords[i, 0]),
                    "y": int(self.attention.coords[i, 1]),
                    "score": float(scores[i]),
                    "shown": float(shown[i]),
                }
                for i in indices
            ]

        return {"top": entries(order[:k]), "bottom": entries(order[::-1][:k])}

    def patch_pixels(self, index: int, slide: SlidePyramid) -> np.ndarray:
        """Patch ``index`` as the encoder saw it (its recorded read level and size, resized to
        the patch size); level 0 when the file does not say how its patches were read."""
        attrs = self.attention.attrs
        if not 0 <= index < len(self.attention):
            raise IndexError(f"no patch {index} (the slide has {len(self.attention)})")
        size0 = self.attention.patch_size_level0
        if attrs.get("read_level") is not None and attrs.get("read_size"):
            level, read_size = int(attrs["read_level"]), int(attrs["read_size"])
        else:
            level, read_size = 0, max(1, round(size0))
        patch_size = int(attrs.get("patch_size") or read_size)
        coords = self.attention.coords[index : index + 1]
        return slide.slide.read_patches(coords, level, read_size, patch_size)[0]


def check_same_slide(attention: AttentionMap, pyramid: SlidePyramid, path: str | Path) -> None:
    """An attention file made on a slide of other dimensions cannot be laid over this one."""
    recorded = attention.attrs.get("slide_dimensions")
    if recorded is not None and tuple(int(v) for v in recorded) != tuple(pyramid.dimensions):
        raise ArtifactError(
            path,
            f"made on a slide of {tuple(recorded)} px but {pyramid.path} is {pyramid.dimensions}",
            "pass --cohort with the slides the predictions were made on",
        )


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


EMPTY_PNG = encode(Image.new("RGBA", (1, 1), (0, 0, 0, 0)), "png")
