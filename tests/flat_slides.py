"""Single-level (flat) tiled TIFF slides, as scanner exports, tifffile or vips write them: the
files on which a whole-level read would exhaust memory."""

from __future__ import annotations

import numpy as np
import tifffile

from slidemil.synthetic.scene import make_scene


def write_flat_tiff(path, width: int, height: int, mpp: float = 0.5, tile: int = 512):
    """A single-level tiled JPEG TIFF (as tifffile, vips or a scanner export writes one), with
    µm/px in its resolution tags, written tile by tile."""
    scene = make_scene(np.random.default_rng(3), width, height, mpp, class_index=1)

    def tiles():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                yield scene.render(x, y, tile, tile)

    resolution = 1e4 / mpp  # px per cm
    tifffile.imwrite(
        path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
        photometric="rgb", compression="jpeg", compressionargs={"level": 90},
        resolution=(resolution, resolution), resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    return path
