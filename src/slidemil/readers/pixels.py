"""Pixel conventions shared by the readers: RGBA from OpenSlide, transparency on white."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

# Plausible scanner resolutions in µm/px: TIFF resolution tags outside this range are defaults
# written by generic software (72 dpi, 1 px/unit), not a real physical size.
PLAUSIBLE_MPP = (0.05, 20.0)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 of un-premultiplied RGBA ``rgba`` (..., 4) blended onto white.

    openslide-python returns un-premultiplied RGBA; the blend is done in integers (rounded), so a
    large region needs 2 bytes per channel of scratch, not a float copy.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    blended = rgb.astype(np.uint16) * a + 255 * (255 - a) + 127
    return (blended // 255).astype(np.uint8)


def regions_one_by_one(
    read_region: Callable[..., np.ndarray],
    locations: Sequence[tuple[int, int]],
    level: int,
    size: tuple[int, int],
) -> np.ndarray:
    """RGB uint8 (N, h, w, 3): ``read_region(location, level, size)`` for each location, stacked
    (a reader whose tile cache serves neighbouring regions needs nothing smarter)."""
    out = np.empty((len(locations), int(size[1]), int(size[0]), 3), np.uint8)
    for row, location in enumerate(locations):
        out[row] = read_region(location, level, size)
    return out


def mpp_from_properties(props: dict[str, str]) -> float | None:
    """Level-0 µm/px from OpenSlide properties: ``openslide.mpp-x/y``, else the TIFF resolution
    tags when their unit is physical and the value a plausible scanner resolution."""
    values = [to_float(props.get("openslide.mpp-x")), to_float(props.get("openslide.mpp-y"))]
    values = [v for v in values if v is not None and v > 0]
    if values:
        return float(np.mean(values))
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    resolutions = [
        to_float(props.get("tiff.XResolution")),
        to_float(props.get("tiff.YResolution")),
    ]
    resolutions = [r for r in resolutions if r is not None and r > 0]
    if microns_per_unit is None or not resolutions:
        return None
    mpp = microns_per_unit / float(np.mean(resolutions))
    low, high = PLAUSIBLE_MPP
    return mpp if low <= mpp <= high else None


def to_float(value: str | None) -> float | None:
    """A property value as a finite float (``None``: absent, not a number, or infinite)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
