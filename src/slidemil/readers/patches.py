"""Read patches and resize them to the patch size: the one copy every stage uses."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from slidemil.readers.protocol import SlideReader


def resize_patch(region: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``region`` resized to ``size`` (width, height) px: area averaging when shrinking (no
    aliasing), bilinear when growing; returned as is when it already has that size."""
    height, width = region.shape[:2]
    if (width, height) == tuple(size):
        return region
    shrinking = width * height > size[0] * size[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(region, tuple(int(s) for s in size), interpolation=interpolation)


def read_patches(
    reader: SlideReader,
    coords: Sequence[tuple[int, int]] | np.ndarray,
    level: int,
    read_size: int,
    patch_size: int,
) -> np.ndarray:
    """RGB uint8 (N, patch_size, patch_size, 3): ``read_size`` px squares read at ``level`` from
    each level-0 (x, y) of ``coords`` in one batched read, each resized to ``patch_size`` px."""
    locations = [(int(x), int(y)) for x, y in coords]
    regions = reader.read_regions(locations, level, (read_size, read_size))
    if read_size == patch_size:
        return regions
    out = np.empty((len(locations), patch_size, patch_size, 3), np.uint8)
    for row, region in enumerate(regions):
        out[row] = resize_patch(region, (patch_size, patch_size))
    return out
