"""The patch grid and each patch's tissue fraction (pure functions).

Origins are multiples of the step in level-0 px, counted from the slide's corner (not from the
tissue's bounding box, as CLAM does), so with ``step = patch size`` a patch's footprint is a whole
number of stored tiles whenever the sizes allow, and two runs over different masks share a grid.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def grid_origins(
    slide_dimensions: tuple[int, int],
    patch_size_level0: float,
    step_level0: float,
    bounds_level0: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Top-left corners (N, 2) int64 level-0 px of the patches lying wholly inside the slide.

    Args:
        slide_dimensions: level-0 (width, height) px.
        patch_size_level0: patch footprint in level-0 px.
        step_level0: distance between origins in level-0 px.
        bounds_level0: optional (x0, y0, x1, y1) to which candidate patches must reach (e.g. the
            tissue's bounding box), so a large empty slide costs nothing.
    """
    if patch_size_level0 <= 0 or step_level0 <= 0:
        raise ValueError("patch size and step must be positive")
    width, height = slide_dimensions
    x0, y0, x1, y1 = bounds_level0 if bounds_level0 is not None else (0, 0, width, height)
    axes = []
    for low, high, extent in ((x0, x1, width), (y0, y1, height)):
        first = max(0, math.floor((low - patch_size_level0) / step_level0) + 1)
        last_fit = math.floor((extent - patch_size_level0) / step_level0 + 1e-9)
        last = min(last_fit, math.ceil(high / step_level0) - 1)
        ks = np.arange(first, last + 1, dtype=np.float64)
        axes.append(np.round(ks * step_level0).astype(np.int64))
    xs, ys = axes
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), np.int64)
    grid_x, grid_y = np.meshgrid(xs, ys)  # row-major: left to right, then top to bottom
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def tissue_fractions(
    mask: np.ndarray, downsample: float, origins: np.ndarray, patch_size_level0: float
) -> np.ndarray:
    """Fraction (0-1) of each patch's area that is tissue in ``mask``.

    The mask is a piecewise-constant image at ``downsample`` level-0 px per px; reading its
    integral image bilinearly at the patch corners gives the exact covered area even when a
    patch spans a fractional number of mask pixels. Area outside the mask counts as glass.
    """
    if origins.size == 0:
        return np.zeros(0, np.float64)
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    side = patch_size_level0 / downsample
    left = origins[:, 0] / downsample
    top = origins[:, 1] / downsample
    area = (
        _bilinear(integral, left + side, top + side)
        - _bilinear(integral, left, top + side)
        - _bilinear(integral, left + side, top)
        + _bilinear(integral, left, top)
    )
    return np.clip(area / (side * side), 0.0, 1.0)


def _bilinear(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``table`` (h+1, w+1) sampled at continuous (x, y), clamped to its edges."""
    height, width = table.shape[0] - 1, table.shape[1] - 1
    x = np.clip(x, 0, width)
    y = np.clip(y, 0, height)
    x0 = np.minimum(np.floor(x).astype(np.int64), max(width - 1, 0))
    y0 = np.minimum(np.floor(y).astype(np.int64), max(height - 1, 0))
    fx, fy = x - x0, y - y0
    x1, y1 = np.minimum(x0 + 1, width), np.minimum(y0 + 1, height)
    top = table[y0, x0] * (1 - fx) + table[y0, x1] * fx
    bottom = table[y1, x0] * (1 - fx) + table[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def select_patches(
    mask: np.ndarray,
    downsample: float,
    slide_dimensions: tuple[int, int],
    patch_size_level0: float,
    step_level0: float,
    min_tissue: float,
) -> np.ndarray:
    """Level-0 origins (N, 2) int64 of the grid patches with tissue fraction >= ``min_tissue``."""
    if not mask.any():
        return np.zeros((0, 2), np.int64)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bounds = (
        cols[0] * downsample,
        rows[0] * downsample,
        (cols[-1] + 1) * downsample,
        (rows[-1] + 1) * downsample,
    )
    origins = grid_origins(slide_dimensions, patch_size_level0, step_level0, bounds)
    fractions = tissue_fractions(mask, downsample, origins, patch_size_level0)
    # A tiny tolerance so a patch exactly at the threshold is kept despite float rounding.
    return origins[fractions >= min_tissue - 1e-9]
