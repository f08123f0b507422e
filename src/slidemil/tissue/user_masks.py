"""User tissue masks: a binary image at any downsample of the slide, or polygons in level-0 px.

* PNG / TIFF / JPEG / BMP of any common mode (1-bit, grey, RGB, RGBA, grey + alpha, palette;
  the rules are in :mod:`slidemil.tissue.mask_image`). Its downsample is inferred from its size
  against the slide's level-0 size, so a mask saved at 1/32 or at full size both work; both axes
  must agree. Large masks are read reduced, with bounded memory.
* GeoJSON (``.geojson`` / ``.json``, as QuPath exports): ``Polygon`` and ``MultiPolygon``
  geometries (a ``FeatureCollection``, a list of features, one feature or a bare geometry), with
  level-0 px coordinates; interior rings are holes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

from slidemil.errors import MaskError
from slidemil.tissue.mask_image import read_mask_image
from slidemil.tissue.segmentation import TissueMask, outlines_of

IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
POLYGON_SUFFIXES = {".geojson", ".json"}
# Relative disagreement allowed between the x and y downsamples (sizes were rounded).
ASPECT_TOLERANCE = 0.02


def load_user_mask(
    path: str | Path, slide_dimensions: tuple[int, int], rasterize_size: int = 2048
) -> TissueMask:
    """Read a user mask for a slide of level-0 ``slide_dimensions`` (width, height) px.

    Args:
        path: image or GeoJSON file.
        rasterize_size: longer side in px of the mask polygons are drawn into.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskError(path, "mask file not found")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _image_mask(path, slide_dimensions)
    if suffix in POLYGON_SUFFIXES:
        return _polygon_mask(path, slide_dimensions, rasterize_size)
    raise MaskError(
        path,
        f"unknown mask type {suffix or '(no suffix)'}",
        "use a binary PNG/TIFF or a GeoJSON polygon file",
    )


def _image_mask(path: Path, slide_dimensions: tuple[int, int]) -> TissueMask:
    mask, cell, (width, height) = read_mask_image(path)
    slide_w, slide_h = slide_dimensions
    ds_x, ds_y = slide_w / width, slide_h / height
    same_aspect = abs(ds_x - ds_y) <= ASPECT_TOLERANCE * max(ds_x, ds_y)
    if not same_aspect and abs(slide_h / ds_x - height) > 1.5:  # allow one px of rounding
        raise MaskError(
            path,
            f"mask is {width}x{height} px but the slide is {slide_w}x{slide_h} px "
            f"(downsamples {ds_x:.3g} and {ds_y:.3g} differ)",
            "save the mask with the slide's aspect ratio, at any downsample",
        )
    if not mask.any():
        raise MaskError(
            path, "mask has no tissue (no pixel counts as tissue; see docs/patching.md)"
        )
    downsample = cell * (ds_x + ds_y) / 2
    contours, holes = outlines_of(mask, downsample)
    return TissueMask(mask, float(downsample), contours, holes, source=str(path))


def _polygon_mask(path: Path, slide_dimensions: tuple[int, int], size: int) -> TissueMask:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MaskError(path, f"not valid JSON: {e}") from e
    polygons = list(_polygons(data))
    if not polygons:
        raise MaskError(path, "no Polygon or MultiPolygon geometry found", "export the annotations")
    slide_w, slide_h = slide_dimensions
    downsample = max(1.0, max(slide_w, slide_h) / size)
    shape = (max(1, math.ceil(slide_h / downsample)), max(1, math.ceil(slide_w / downsample)))
    canvas = np.zeros(shape, np.uint8)
    contours, holes = [], []
    try:
        for rings in polygons:
            level0 = [np.asarray(ring, dtype=np.float64).reshape(-1, 2)[:, :2] for ring in rings]
            cv2.fillPoly(canvas, [_to_mask_px(level0[0], downsample)], 1)
            if len(level0) > 1:
                cv2.fillPoly(canvas, [_to_mask_px(r, downsample) for r in level0[1:]], 0)
            contours.append(level0[0])
            holes.append(level0[1:])
    except (ValueError, TypeError, IndexError) as e:
        raise MaskError(path, f"malformed polygon coordinates: {e}") from e
    mask = canvas.astype(bool)
    if not mask.any():
        raise MaskError(
            path,
            "the polygons cover no part of the slide",
            "coordinates must be level-0 px of this slide",
        )
    return TissueMask(mask, float(downsample), contours, holes, source=str(path))


def _to_mask_px(ring: np.ndarray, downsample: float) -> np.ndarray:
    return np.round(ring / downsample).astype(np.int32)


def _polygons(data):
    """Yield each polygon as a list of rings (exterior first) from any GeoJSON shape."""
    if isinstance(data, list):
        for item in data:
            yield from _polygons(item)
        return
    if not isinstance(data, dict):
        return
    kind = data.get("type")
    if kind == "FeatureCollection":
        yield from _polygons(data.get("features") or [])
    elif kind == "Feature":
        yield from _polygons(data.get("geometry") or {})
    elif kind == "GeometryCollection":
        yield from _polygons(data.get("geometries") or [])
    elif kind == "Polygon":
        if data.get("coordinates"):
            yield data["coordinates"]
    elif kind == "MultiPolygon":
        yield from (p for p in data.get("coordinates") or [] if p)
