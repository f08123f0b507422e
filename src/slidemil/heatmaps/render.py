"""Pure functions that turn per-patch scores into images.

Every patch is placed at its true footprint: level-0 top-left ``coords[i]`` and a side of
``patch_size_level0`` level-0 px, mapped onto a canvas at ``downsample`` (level-0 px per canvas
px). A canvas pixel belongs to a patch when its centre lies inside the footprint; where patches
overlap (step smaller than the patch) their scores are averaged. This is right for any patch
size, step, read level and slide resolution, because nothing but level-0 geometry is used.
"""

from __future__ import annotations

import cv2
import matplotlib
import numpy as np
from scipy.stats import rankdata

NORMALISATIONS = ("rank", "percentile", "minmax", "none")


def normalise_scores(values: np.ndarray, method: str = "rank") -> np.ndarray:
    """Scores mapped to [0, 1] for display.

    ``rank``: the fraction of patches scoring lower (uniform spread; what CLAM calls
    percentiles). ``percentile``: clipped to the 1st-99th percentiles, then scaled (keeps the
    relative size of differences, robust to a few extreme patches). ``minmax``: scaled between
    min and max. ``none``: unchanged.
    """
    values = np.asarray(values, np.float64)
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}")
    if method == "none" or values.size == 0:
        return values.astype(np.float32)
    if method == "rank":
        if values.size == 1:
            return np.ones(1, np.float32)
        return ((rankdata(values, method="average") - 1) / (values.size - 1)).astype(np.float32)
    low, high = (
        np.percentile(values, (1, 99)) if method == "percentile" else (values.min(), values.max())
    )
    if high <= low:
        return np.full(values.shape, 0.5, np.float32)
    return np.clip((values - low) / (high - low), 0, 1).astype(np.float32)


def footprint_boxes(
    coords: np.ndarray, patch_size_level0: float, downsample: float, shape: tuple[int, int]
) -> np.ndarray:
    """(N, 4) integer canvas boxes x0, y0, x1, y1 (end-exclusive, clipped to ``shape`` = (h, w)).

    A pixel belongs to a patch when its centre lies inside the footprint; a footprint narrower
    than a pixel that holds no pixel centre takes the pixel under its own centre, so no patch
    vanishes from a coarse canvas."""
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    start = coords / downsample
    end = (coords + patch_size_level0) / downsample
    # pixel j is inside when its centre j + 0.5 lies in [start, end)
    first = np.ceil(start - 0.5).astype(np.int64)
    stop = np.ceil(end - 0.5).astype(np.int64)
    empty = stop <= first
    centre = np.floor((start + end) / 2).astype(np.int64)
    first = np.where(empty, centre, first)
    stop = np.where(empty, centre + 1, stop)
    height, width = shape
    x0 = np.clip(first[:, 0], 0, width)
    x1 = np.clip(stop[:, 0], 0, width)
    y0 = np.clip(first[:, 1], 0, height)
    y1 = np.clip(stop[:, 1], 0, height)
    return np.stack([x0, y0, x1, y1], axis=1)


def rasterise(
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: float,
    shape: tuple[int, int],
    downsample: float,
) -> np.ndarray:
    """float32 (h, w) canvas of the mean score of the patches covering each pixel; NaN where no
    patch does. Cost O(N + h·w) whatever the overlap (summed-area accumulation)."""
    height, width = shape
    boxes = footprint_boxes(coords, patch_size_level0, downsample, shape)
    values = np.asarray(values, np.float64).reshape(-1)
    if values.shape[0] != boxes.shape[0]:
        raise ValueError(f"{boxes.shape[0]} patches but {values.shape[0]} values")
    x0, y0, x1, y1 = boxes.T
    # float64 sums and int32 counts: exact enough for any overlap, 12 bytes per canvas pixel
    total = _box_sums(values, x0, y0, x1, y1, (height, width), np.float64)
    count = _box_sums(np.ones_like(x0), x0, y0, x1, y1, (height, width), np.int32)
    canvas = np.full((height, width), np.nan, np.float32)
    covered = count > 0
    canvas[covered] = total[covered] / count[covered]
    return canvas


def _box_sums(weights, x0, y0, x1, y1, shape, dtype) -> np.ndarray:
    """Sum over boxes of their weight at every pixel, by differences then a 2-D prefix sum."""
    height, width = shape
    grid = np.zeros((height + 1, width + 1), dtype)
    weights = np.asarray(weights, dtype)
    np.add.at(grid, (y0, x0), weights)
    np.add.at(grid, (y0, x1), -weights)
    np.add.at(grid, (y1, x0), -weights)
    np.add.at(grid, (y1, x1), weights)
    np.cumsum(grid, axis=0, out=grid)
    np.cumsum(grid, axis=1, out=grid)
    return grid[:height, :width]


def smooth(canvas: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing that ignores uncovered (NaN) pixels and keeps them uncovered."""
    if sigma_px <= 0:
        return canvas
    covered = np.isfinite(canvas)
    filled = np.where(covered, canvas, 0).astype(np.float32)
    weight = covered.astype(np.float32)
    blur = dict(ksize=(0, 0), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_CONSTANT)
    numerator = cv2.GaussianBlur(filled, **blur)
    denominator = cv2.GaussianBlur(weight, **blur)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = numerator / denominator
    return np.where(covered, out, np.nan).astype(np.float32)


def colorize(canvas: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """RGBA uint8 of a [0, 1] canvas; uncovered pixels are fully transparent."""
    rgba = matplotlib.colormaps[cmap](np.nan_to_num(canvas, nan=0.0), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(canvas), 255, 0)
    return rgba


def overlay(image: np.ndarray, heat_rgba: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``image`` with the heat map blended in at ``alpha`` where it is defined."""
    if image.shape[:2] != heat_rgba.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and heat map {heat_rgba.shape[:2]} differ")
    weight = (heat_rgba[..., 3:4].astype(np.float32) / 255.0) * alpha
    out = image.astype(np.float32) * (1 - weight) + heat_rgba[..., :3].astype(np.float32) * weight
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
