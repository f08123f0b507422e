"""Heat maps for slide viewers: QuPath GeoJSON tiles and a full-resolution pyramidal TIFF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slidemil import atomic
from slidemil.formats.pyramid_tiff import write_pyramid
from slidemil.heatmaps.render import colorize, overlay, rasterise, smooth
from slidemil.slide import Slide

# The heat grid behind the TIFF: fine enough that a patch edge is off by at most 1/16 of the
# smaller of patch and step, and never more than this many cells (about 200 MB while drawing).
CELLS_PER_PATCH = 8
MAX_GRID_CELLS = 2**24


def write_geojson(
    path: str | Path,
    coords: np.ndarray,
    patch_size_level0: float,
    measurements: dict[str, np.ndarray],
) -> Path:
    """One QuPath ``tile`` per patch (a level-0 square) with its scores as measurements.

    QuPath (0.4+) imports it with File > Import objects; the measurements colour the tiles
    (Measure > Show measurement maps).
    """
    size = float(patch_size_level0)
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, np.float64)):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "measurements": {k: float(v[i]) for k, v in measurements.items()},
                },
            }
        )
    atomic.write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))
    return Path(path)


def heat_grid(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    slide_dimensions: tuple[int, int],
    sigma_patches: float = 0.0,
) -> tuple[np.ndarray, float]:
    """A whole-slide canvas of ``scores`` (NaN where no patch lies) and its cell size in level-0
    px, for drawing the heat map at any resolution.

    When every coordinate and the patch size are multiples of one cell size (a regular grid of
    any step), that cell size is used and patch edges are exact; otherwise, and when smoothing
    (which needs cells finer than a patch to look smooth), the cells are ``CELLS_PER_PATCH``
    times smaller than a patch or its spacing. ``sigma_patches``: Gaussian sigma in patch
    sides."""
    width, height = slide_dimensions
    cell = grid_cell(coords, patch_size_level0, exact=sigma_patches <= 0)
    cell = max(cell, math.sqrt(width * height / MAX_GRID_CELLS), 1.0)
    shape = (max(1, math.ceil(height / cell)), max(1, math.ceil(width / cell)))
    canvas = rasterise(coords, scores, patch_size_level0, shape, cell)
    return smooth(canvas, sigma_patches * patch_size_level0 / cell), cell


def grid_cell(coords: np.ndarray, patch_size_level0: float, exact: bool = True) -> float:
    """With ``exact``, the largest level-0 cell size on which every patch edge falls, if it is
    not much smaller than a patch; else a fraction of the patch size or of the patches'
    spacing."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    size = float(patch_size_level0)
    spacing = _spacing(coords) or size
    fallback = max(1.0, min(size, spacing) / CELLS_PER_PATCH)
    if not exact or abs(size - round(size)) > 1e-6 or coords.size == 0:
        return fallback
    common = int(np.gcd.reduce(np.append(coords.ravel(), round(size))))
    return float(common) if common >= fallback else fallback


def _spacing(coords: np.ndarray) -> float:
    """The typical distance between neighbouring patch origins (the step): the median gap
    between distinct x (or y) values, the smaller of the two axes; 0 for a single patch."""
    gaps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        if values.size > 1:
            gaps.append(float(np.median(np.diff(values))))
    return min(gaps) if gaps else 0.0


def sample_grid(
    grid: np.ndarray,
    cell: float,
    x0: float,
    y0: float,
    size: tuple[int, int],
    downsample: float,
) -> np.ndarray:
    """(h, w) values of ``grid`` (``cell`` level-0 px per cell) for an image of ``size`` = (w, h)
    px whose top-left is at level-0 ``x0, y0`` and whose pixels are ``downsample`` level-0 px:
    the cell under each pixel's centre (no interpolation), NaN outside the grid."""
    rows, columns = grid.shape
    w, h = size
    column = np.floor((x0 + (np.arange(w) + 0.5) * downsample) / cell).astype(np.int64)
    row = np.floor((y0 + (np.arange(h) + 0.5) * downsample) / cell).astype(np.int64)
    inside = ((row >= 0) & (row < rows))[:, None] & ((column >= 0) & (column < columns))[None, :]
    values = grid[np.clip(row, 0, rows - 1)[:, None], np.clip(column, 0, columns - 1)[None, :]]
    return np.where(inside, values, np.nan)


def write_heatmap_tiff(
    path: str | Path,
    slide: Slide,
    grid: np.ndarray,
    cell: float,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Path:
    """A pyramidal tiled TIFF as large as the slide's level 0, with the slide's µm/px, that
    OpenSlide and QuPath open at full resolution: the heat map (``grid``, ``cell`` level-0 px
    per grid cell, values in [0, 1]) drawn over the slide at ``alpha``; the slide shows where no
    patch lies. Written tile by tile, so memory does not grow with the slide."""
    width, height = slide.dimensions

    def render(x0: float, y0: float, w: int, h: int, downsample: float) -> np.ndarray:
        values = sample_grid(grid, cell, x0, y0, (w, h), downsample)
        base = slide.read_scaled((int(x0), int(y0)), slide.plan_for_downsample(downsample), (w, h))
        return overlay(base, colorize(values, cmap), alpha)

    return write_pyramid(
        path, width, height, render, mpp=slide.mpp_or_none, vendor="generic", quality=90
    )
