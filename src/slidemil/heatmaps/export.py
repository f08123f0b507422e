"""Heat maps for slide viewers: QuPath GeoJSON tiles and a full-resolution pyramidal TIFF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from slidemil import atomic
from slidemil.formats.pyramid_tiff import write_pyramid
from slidemil.heatmaps.render import colorize, overlay, rasterise, smooth
from slidemil.slide import Slide

# The heat grid behind the TIFF has this many cells across one patch (or one step, if smaller).
CELLS_PER_PATCH = 8


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
    step_level0: float,
    slide_dimensions: tuple[int, int],
    sigma_patches: float = 0.0,
) -> tuple[np.ndarray, float]:
    """A whole-slide canvas of scores fine enough to keep every patch edge, and its downsample."""
    cell = max(1.0, min(patch_size_level0, step_level0) / CELLS_PER_PATCH)
    width, height = slide_dimensions
    shape = (math.ceil(height / cell), math.ceil(width / cell))
    canvas = rasterise(coords, scores, patch_size_level0, shape, cell)
    return smooth(canvas, sigma_patches * patch_size_level0 / cell), cell


def write_heatmap_tiff(
    path: str | Path,
    slide: Slide,
    grid: np.ndarray,
    grid_downsample: float,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    blend: bool = True,
) -> Path:
    """A pyramidal tiled TIFF as large as the slide's level 0, with the slide's µm/px, that
    OpenSlide and QuPath open at full resolution. ``blend`` draws the heat map over the slide;
    otherwise uncovered areas are white. Written tile by tile: memory does not grow with size."""
    width, height = slide.dimensions

    def render(x0: float, y0: float, w: int, h: int, downsample: float) -> np.ndarray:
        # canvas coordinates of the tile's pixel centres
        xs = ((x0 + (np.arange(w) + 0.5) * downsample) / grid_downsample - 0.5).astype(np.float32)
        ys = ((y0 + (np.arange(h) + 0.5) * downsample) / grid_downsample - 0.5).astype(np.float32)
        map_x = np.broadcast_to(xs[None, :], (h, w)).copy()
        map_y = np.broadcast_to(ys[:, None], (h, w)).copy()
        values = cv2.remap(
            grid,
            map_x,
            map_y,
            cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=float("nan"),
        )
        heat = colorize(values, cmap)
        if blend:
            base = slide.read_scaled(
                (int(x0), int(y0)), slide.plan_for_downsample(downsample), (w, h)
            )
        else:
            base = np.full((h, w, 3), 255, np.uint8)
        return overlay(base, heat, alpha if blend else 1.0)

    return write_pyramid(
        path, width, height, render, mpp=slide.mpp_or_none, vendor="generic", quality=90
    )
