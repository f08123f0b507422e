"""Which pages of a tiled TIFF are pyramid levels, and where their tiles are, as OpenSlide sees it.

OpenSlide's rules (its ``aperio`` and ``generic-tiff`` drivers), which this module follows so the
tile reader reports the same levels, sizes and downsamples:

- Aperio SVS: every *tiled* directory is a level, in file order (the stripped ones are the
  thumbnail, label and macro images). A tile with 0 bytes is "missing": OpenSlide paints it from
  the finer level, and marks the tiles of the next coarser level that cover it missing too.
- generic tiled TIFF: the first directory and every tiled directory flagged reduced-resolution
  (``NewSubfileType`` bit 0), sorted by width, widest first. A 0-byte tile is transparent.
- the downsample of level ``i`` is the mean of ``w0 / wi`` and ``h0 / hi``.

Other TIFF-based vendor formats (Philips, Ventana, Hamamatsu NDPI, ...) keep their own geometry
rules, so only these two structures are read here; everything else stays with OpenSlide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

# TIFF Compression values the tile codecs decode (33003/33005: Aperio's JPEG 2000, YCbCr / RGB).
COMPRESSION_NONE, COMPRESSION_LZW, COMPRESSION_JPEG = 1, 5, 7
COMPRESSION_ADOBE_DEFLATE, COMPRESSION_DEFLATE, COMPRESSION_PACKBITS = 8, 32946, 32773
COMPRESSION_APERIO_JP2K_YCBCR, COMPRESSION_APERIO_JP2K_RGB = 33003, 33005
LOSSLESS_COMPRESSIONS = {
    COMPRESSION_NONE, COMPRESSION_LZW, COMPRESSION_ADOBE_DEFLATE, COMPRESSION_DEFLATE,
    COMPRESSION_PACKBITS,
}  # fmt: skip
APERIO_JP2K = {COMPRESSION_APERIO_JP2K_YCBCR, COMPRESSION_APERIO_JP2K_RGB}
PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
PREDICTOR_NONE, PREDICTOR_HORIZONTAL = 1, 2
FILETYPE_REDUCEDIMAGE = 1

STRUCTURES = ("aperio", "generic-tiff")


class UnsupportedLayoutError(Exception):
    """The file is not a structure the tile reader reads; the message says why."""


@dataclass(frozen=True)
class TileLevel:
    """One pyramid level stored as a grid of tiles (sizes in px of this level)."""

    page: int  # TIFF directory index
    width: int
    height: int
    tile_width: int
    tile_height: int
    compression: int
    photometric: int
    predictor: int
    jpeg_tables: bytes | None
    offsets: np.ndarray  # uint64 (tiles_down * tiles_across,), row-major
    bytecounts: np.ndarray
    missing: frozenset[int]  # tile indices with no data

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_height)


@dataclass(frozen=True)
class TiffLayout:
    """The pyramid of a tiled TIFF/SVS file: levels finest first and their downsamples.

    ``missing_from_finer`` is true for Aperio, whose missing tiles OpenSlide paints from the
    finer level (the tile reader hands such regions to OpenSlide); false means missing tiles
    are transparent.
    """

    path: Path
    structure: str
    levels: tuple[TileLevel, ...]
    downsamples: tuple[float, ...]
    missing_from_finer: bool

    @property
    def compressions(self) -> set[int]:
        return {level.compression for level in self.levels}


def read_tiff_layout(path: str | Path, structure: str) -> TiffLayout:
    """The levels of ``path`` read as OpenSlide's ``structure`` driver (``"aperio"`` or
    ``"generic-tiff"``) would; :class:`UnsupportedLayoutError` when a level cannot be tile-read."""
    if structure not in STRUCTURES:
        raise UnsupportedLayoutError(f"{structure or 'this'} files are read by OpenSlide")
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            levels = [_level(page, index) for index, page in _level_pages(pages, structure)]
    except UnsupportedLayoutError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError) as e:
        raise UnsupportedLayoutError(f"tifffile cannot parse it: {e}") from e
    if not levels:
        raise UnsupportedLayoutError("no tiled pyramid level")
    if structure == "generic-tiff":
        levels.sort(key=lambda level: -level.width)
    else:
        levels = _propagate_missing(levels)
    w0, h0 = levels[0].width, levels[0].height
    downsamples = tuple(
        1.0 if i == 0 else (h0 / level.height + w0 / level.width) / 2.0
        for i, level in enumerate(levels)
    )
    return TiffLayout(
        path=path,
        structure=structure,
        levels=tuple(levels),
        downsamples=downsamples,
        missing_from_finer=structure == "aperio",
    )


def _level_pages(pages: list, structure: str) -> list[tuple[int, object]]:
    chosen = []
    for index, page in enumerate(pages):
        if not page.is_tiled:
            continue
        if (
            structure == "generic-tiff"
            and index != 0
            and not int(page.subfiletype) & FILETYPE_REDUCEDIMAGE
        ):
            continue
        chosen.append((index, page))
    return chosen


def _level(page, index: int) -> TileLevel:
    compression = int(page.compression)
    photometric = int(page.photometric)
    predictor = int(page.predictor)
    where = f"directory {index}"
    if int(page.imagedepth) != 1 or int(page.tiledepth) != 1:
        raise UnsupportedLayoutError(f"{where}: volumetric tiles")
    if int(page.bitspersample) != 8 or int(page.samplesperpixel) != 3:
        raise UnsupportedLayoutError(
            f"{where}: {page.samplesperpixel} samples of {page.bitspersample} bits (need RGB, 8)"
        )
    if int(page.planarconfig) != 1:
        raise UnsupportedLayoutError(f"{where}: separate colour planes")
    if compression == COMPRESSION_JPEG:
        if photometric not in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR):
            raise UnsupportedLayoutError(f"{where}: JPEG with photometric {photometric}")
    elif compression in APERIO_JP2K:
        pass  # colour space given by the compression value itself
    elif compression in LOSSLESS_COMPRESSIONS:
        if photometric != PHOTOMETRIC_RGB:
            raise UnsupportedLayoutError(f"{where}: photometric {photometric} without JPEG")
        if predictor not in (PREDICTOR_NONE, PREDICTOR_HORIZONTAL):
            raise UnsupportedLayoutError(f"{where}: predictor {predictor}")
    else:
        raise UnsupportedLayoutError(f"{where}: compression {compression}")
    offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
    bytecounts = np.asarray(page.databytecounts, dtype=np.uint64)
    level = TileLevel(
        page=index,
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        compression=compression,
        photometric=photometric,
        predictor=predictor,
        jpeg_tables=bytes(page.jpegtables) if page.jpegtables else None,
        offsets=offsets,
        bytecounts=bytecounts,
        missing=frozenset(np.flatnonzero(bytecounts == 0).tolist()),
    )
    if len(offsets) != level.tiles_across * level.tiles_down:
        raise UnsupportedLayoutError(f"{where}: {len(offsets)} tile offsets for a grid of tiles")
    return level


def _propagate_missing(levels: list[TileLevel]) -> list[TileLevel]:
    """Aperio: a coarser tile built from a missing finer tile is itself suspect (OpenSlide marks
    it missing), so the marks travel down the pyramid."""
    out = [levels[0]]
    for level in levels[1:]:
        finer = out[-1]
        missing = set(level.missing)
        concat_x = max(1, round(finer.tiles_across / level.tiles_across))
        concat_y = max(1, round(finer.tiles_down / level.tiles_down))
        for tile in finer.missing:
            col, row = tile % finer.tiles_across, tile // finer.tiles_across
            missing.add((row // concat_y) * level.tiles_across + col // concat_x)
        out.append(_with_missing(level, frozenset(missing)))
    return out


def _with_missing(level: TileLevel, missing: frozenset[int]) -> TileLevel:
    fields = {name: getattr(level, name) for name in level.__dataclass_fields__}
    fields["missing"] = missing
    return TileLevel(**fields)
