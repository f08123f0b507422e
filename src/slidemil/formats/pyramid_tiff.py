"""Write real pyramidal, tiled, JPEG-compressed slides (Aperio SVS or generic TIFF), tile by tile.

The layout follows Aperio's: a tiled full-resolution image whose ImageDescription starts with
``Aperio`` and carries ``AppMag`` and ``MPP``; a small stripped thumbnail as the second image;
then tiled reduced levels (downsample 4 each). Pixels come from a ``render(x0, y0, w, h,
downsample)`` callable and are generated one tile at a time, so memory stays bounded whatever
the slide size. ``vendor="generic"`` writes the same pyramid as a plain tiled TIFF (OpenSlide's
generic-tiff), with µm/px only in the TIFF resolution tags.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from slidemil.atomic import atomic_path

Render = Callable[[float, float, int, int, float], np.ndarray]

LEVEL_FACTOR = 4
SMALLEST_LEVEL = 1024  # stop adding levels once the longer side is at most this
THUMBNAIL_SIZE = 768


def pyramid_downsamples(width: int, height: int) -> list[int]:
    downsamples = [1]
    while max(width, height) / downsamples[-1] > SMALLEST_LEVEL:
        downsamples.append(downsamples[-1] * LEVEL_FACTOR)
    return downsamples


def write_pyramid(
    path: str | Path,
    width: int,
    height: int,
    render: Render,
    *,
    mpp: float | None,
    magnification: float | None = None,
    tile: int = 256,
    quality: int = 85,
    vendor: str = "aperio",
    slide_name: str = "synthetic",
) -> Path:
    """Write a pyramidal slide to ``path`` atomically and return the path.

    Args:
        width, height: level-0 size in px.
        render: pixel source, called per tile with level-0 origin and the level's downsample.
        mpp: level-0 µm/px, or ``None`` to write a slide without physical resolution.
        magnification: objective power recorded as ``AppMag`` (Aperio only).
        vendor: ``"aperio"`` (SVS) or ``"generic"`` (plain tiled TIFF).
    """
    if vendor not in ("aperio", "generic"):
        raise ValueError(f"vendor must be 'aperio' or 'generic', got {vendor!r}")
    path = Path(path)
    downsamples = pyramid_downsamples(width, height)
    now = time.gmtime()
    fields = {
        "AppMag": magnification,
        "MPP": mpp,
        "Filename": slide_name,
        "Date": time.strftime("%m/%d/%y", now),
        "Time": time.strftime("%H:%M:%S", now),
        "ScanScope ID": "SLIDEMIL-SYNTH",
    }
    meta = "|".join(f"{k} = {v}" for k, v in fields.items() if v is not None)
    header = "Aperio Image Library v12.0.15 \r\n"

    def description(text: str) -> str:
        return f"{header}{text}|{meta}" if vendor == "aperio" else ""

    common = {"photometric": "rgb", "metadata": None}
    if mpp is not None:
        res = 1e4 / mpp  # px per cm
        common.update(resolution=(res, res), resolutionunit="CENTIMETER")
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}

    with (
        atomic_path(path) as tmp,
        tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(width, height)) as tw,
    ):
        for index, ds in enumerate(downsamples):
            w, h = max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))
            if index == 0:
                text = (
                    f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                )
            else:
                text = f"{width}x{height} -> {w}x{h} - ({tile}x{tile}) JPEG/RGB Q={quality}"
            tw.write(
                _tiles(render, w, h, ds, tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=description(text),
                subfiletype=0 if index == 0 else 1,
                **common,
                **jpeg,
            )
            if index == 0 and vendor == "aperio":
                thumb_ds = max(width, height) / THUMBNAIL_SIZE
                tw_, th_ = max(1, round(width / thumb_ds)), max(1, round(height / thumb_ds))
                tw.write(
                    render(0, 0, tw_, th_, thumb_ds),
                    description=description(f"{width}x{height} -> {tw_}x{th_} - "),
                    photometric="rgb",
                    metadata=None,
                    **jpeg,
                )
    return path


def _tiles(render: Render, width: int, height: int, downsample: float, tile: int) -> Iterator:
    """Tiles of one level in row-major order, edge tiles padded to full size."""
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            w, h = min(tile, width - tx), min(tile, height - ty)
            pixels = render(tx * downsample, ty * downsample, w, h, downsample)
            if (h, w) != (tile, tile):
                padded = np.empty((tile, tile, 3), np.uint8)
                padded[:] = pixels[-1:, -1:]  # repeat the edge colour, as scanners do
                padded[:h, :w] = pixels
                pixels = padded
            yield pixels


def _needs_bigtiff(width: int, height: int) -> bool:
    # JPEG at Q85 is ~10:1 on tissue; keep a wide margin under classic TIFF's 4 GB.
    return width * height * 3 > 2**31
