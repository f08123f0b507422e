"""The one place a slide file is opened: pick the reader (``auto``, ``openslide`` or ``tiles``)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import openslide

from slidemil.errors import SlideOpenError
from slidemil.inputs import slide_file_problem
from slidemil.readers.openslide_reader import OpenSlideReader
from slidemil.readers.protocol import ReaderName, SlideReader
from slidemil.readers.tiff_layout import TiffLayout, UnsupportedLayoutError, read_tiff_layout
from slidemil.readers.tile_codecs import decode_tile
from slidemil.readers.tile_reader import TileReader

READERS: tuple[str, ...] = get_args(ReaderName)
TILES_FIX = "use --reader auto or --reader openslide"


def pick_reader(path: str | Path, reader: ReaderName = "auto") -> SlideReader:
    """Open ``path`` with the chosen reader.

    ``auto`` uses the raw-tile reader when OpenSlide recognises the file as an Aperio SVS or a
    generic tiled TIFF and every level's tiles are a kind the tile reader decodes (one tile is
    decoded to be sure), and OpenSlide otherwise; ``tiles`` refuses a file it cannot read with a
    :class:`SlideOpenError` saying why. The returned reader's ``name`` says which was used.
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    path = Path(path)
    problem = slide_file_problem(path)  # missing, a directory, empty, no permission
    if problem is not None:
        raise problem
    if reader == "openslide":
        return OpenSlideReader(path)
    try:
        layout = tile_layout(path)
    except UnsupportedLayoutError as e:
        if reader == "tiles":
            raise SlideOpenError(path, f"the tile reader cannot read it: {e}", TILES_FIX) from e
        return OpenSlideReader(path)
    return TileReader(layout)


def tile_layout(path: str | Path) -> TiffLayout:
    """The file's tiled pyramid when the tile reader can read it (the structure is OpenSlide's
    detection; one tile is decoded as a check), else :class:`UnsupportedLayoutError`."""
    try:
        structure = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError) as e:
        raise UnsupportedLayoutError(f"OpenSlide cannot identify it: {e}") from e
    layout = read_tiff_layout(path, structure or "")
    _check_decodes(layout)
    return layout


def _check_decodes(layout: TiffLayout) -> None:
    for level_index, level in enumerate(layout.levels):
        stored = [i for i in range(len(level.bytecounts)) if i not in level.missing]
        if not stored:
            continue
        with TileReader(layout) as reader:
            data = reader.raw_tile(level_index, stored[0])
        try:
            decode_tile(level, data)
        except Exception as e:
            raise UnsupportedLayoutError(f"level {level_index}'s tiles do not decode: {e}") from e
        return
