"""Slide access: one narrow interface over OpenSlide.

Coordinates follow OpenSlide: ``(x, y)`` locations are always level-0 pixels, sizes are pixels at
the level being read. Physical resolution is in µm/px ("mpp"). Everything a stage needs from a
slide goes through :class:`Slide`, so a faster tile reader can later sit behind the same methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from slidemil.errors import MissingMppError, SlideOpenError, SlideReadError

# Plausible scanner resolutions in µm/px: TIFF resolution tags outside this range are defaults
# written by generic software (72 dpi, 1 px/unit), not a real physical size.
PLAUSIBLE_MPP = (0.05, 20.0)

# Downsamples within this relative tolerance of a level count as that level (pyramids built by
# rounding dimensions report 3.9998 instead of 4).
LEVEL_TOLERANCE = 1e-2

MPP_FIX = "give it with --slide-mpp, or a 'slide_mpp' column in the cohort CSV"


@dataclass(frozen=True)
class ReadPlan:
    """How to obtain pixels at a target resolution.

    ``level`` is the pyramid level to read, ``level_downsample`` its downsample from level 0, and
    ``scale`` the extra resize factor from that level to the target (``>= 1`` means shrink), so
    ``target_downsample = level_downsample * scale``.
    """

    level: int
    level_downsample: float
    scale: float

    @property
    def target_downsample(self) -> float:
        return self.level_downsample * self.scale


class Slide:
    """A whole-slide image opened with OpenSlide.

    Args:
        path: the slide file (any format OpenSlide reads: .svs, .tif, .ndpi, .mrxs, ...).
        mpp_override: level-0 µm/px to use instead of (or in the absence of) the file's metadata.
    """

    def __init__(self, path: str | Path, mpp_override: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SlideOpenError(self.path, "file not found")
        if self.path.is_dir():
            raise SlideOpenError(self.path, "is a directory, expected a slide file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideOpenError(self.path, "not a slide format OpenSlide can read") from e
        except (openslide.OpenSlideError, OSError) as e:
            raise SlideOpenError(self.path, f"OpenSlide cannot open it: {e}") from e
        if mpp_override is not None and not mpp_override > 0:
            raise MissingMppError(self.path, f"µm/px override must be positive, got {mpp_override}")
        self._mpp_override = mpp_override

    # -- geometry -------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in px."""
        return self._osr.dimensions

    @property
    def level_count(self) -> int:
        return self._osr.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._osr.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    @property
    def vendor(self) -> str | None:
        return self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR)

    # -- physical resolution ----------------------------------------------------------------------
    @property
    def mpp_or_none(self) -> float | None:
        """Level-0 µm/px: the override, else the file's metadata, else ``None``."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        props = self._osr.properties
        values = [
            _to_float(props.get(openslide.PROPERTY_NAME_MPP_X)),
            _to_float(props.get(openslide.PROPERTY_NAME_MPP_Y)),
        ]
        values = [v for v in values if v is not None and v > 0]
        if values:
            return float(np.mean(values))
        return _mpp_from_tiff_resolution(props)

    @property
    def mpp(self) -> float:
        """Level-0 µm/px; :class:`MissingMppError` when neither metadata nor override has it."""
        mpp = self.mpp_or_none
        if mpp is None:
            raise MissingMppError(self.path, "slide has no µm/px in its metadata", MPP_FIX)
        return mpp

    @property
    def objective_power(self) -> float | None:
        """Scanning magnification from metadata (e.g. 20 or 40), or ``None``."""
        return _to_float(self._osr.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    def mpp_for_magnification(self, magnification: float) -> float:
        """µm/px that corresponds to ``magnification`` on this slide.

        Uses the slide's objective power when recorded (``mpp × power / magnification``), else the
        usual 10 µm/px ÷ magnification convention (20× ≈ 0.5 µm/px).
        """
        if magnification <= 0:
            raise ValueError(f"magnification must be positive, got {magnification}")
        power = self.objective_power
        if power and self.mpp_or_none is not None:
            return self.mpp_or_none * power / magnification
        return 10.0 / magnification

    # -- level choice -----------------------------------------------------------------------------
    def plan_for_downsample(self, downsample: float) -> ReadPlan:
        """The deepest level whose downsample does not exceed ``downsample``, plus the resize."""
        if downsample <= 0:
            raise ValueError(f"downsample must be positive, got {downsample}")
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * (1 + LEVEL_TOLERANCE):
                best = level
        level_ds = self.level_downsamples[best]
        scale = downsample / level_ds
        if abs(scale - 1) < LEVEL_TOLERANCE:
            scale = 1.0
        return ReadPlan(level=best, level_downsample=level_ds, scale=scale)

    def plan_for_mpp(self, target_mpp: float) -> ReadPlan:
        """Read plan for pixels at ``target_mpp`` µm/px (finer than the scan is upsampled)."""
        if target_mpp <= 0:
            raise ValueError(f"target µm/px must be positive, got {target_mpp}")
        return self.plan_for_downsample(target_mpp / self.mpp)

    # -- pixels -----------------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of ``size`` px at ``level``, top-left at level-0 ``location``.

        Transparent pixels (outside the scanned area) come back white.
        """
        try:
            rgba = np.asarray(
                self._osr.read_region((int(location[0]), int(location[1])), level, size)
            )
        except openslide.OpenSlideError as e:
            raise SlideReadError(
                self.path, f"cannot read region at {location} level {level}: {e}"
            ) from e
        return _composite_on_white(rgba)

    def read_scaled(
        self, location: tuple[int, int], plan: ReadPlan, size: tuple[int, int]
    ) -> np.ndarray:
        """``size`` px at ``plan``'s target resolution, read from ``plan.level`` and resized."""
        if plan.scale == 1.0:
            return self.read_region(location, plan.level, size)
        read_size = (math.ceil(size[0] * plan.scale), math.ceil(size[1] * plan.scale))
        region = self.read_region(location, plan.level, read_size)
        interp = cv2.INTER_AREA if plan.scale > 1 else cv2.INTER_LINEAR
        return cv2.resize(region, size, interpolation=interp)

    def read_level(self, level: int) -> np.ndarray:
        """The whole of ``level`` as RGB. Only for low-resolution levels: callers bound the size."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is at most ``max_size`` px, and its downsample."""
        width, height = self.dimensions
        downsample = max(width, height) / max_size
        if downsample <= 1:
            return self.read_level(0), 1.0
        plan = self.plan_for_downsample(downsample)
        size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        image = self.read_scaled((0, 0), plan, size)
        return image, downsample

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = self.mpp_or_none
        return f"Slide({self.path.name!r}, {w}x{h}, levels={self.level_count}, mpp={mpp})"


def _to_float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _mpp_from_tiff_resolution(props) -> float | None:
    """µm/px from ``tiff.XResolution`` / ``tiff.ResolutionUnit`` when they look physical."""
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    microns_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    resolutions = [
        _to_float(props.get("tiff.XResolution")),
        _to_float(props.get("tiff.YResolution")),
    ]
    resolutions = [r for r in resolutions if r is not None and r > 0]
    if microns_per_unit is None or not resolutions:
        return None
    mpp = microns_per_unit / float(np.mean(resolutions))
    low, high = PLAUSIBLE_MPP
    return mpp if low <= mpp <= high else None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # openslide-python returns un-premultiplied RGBA; blend onto white.
    a = alpha.astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
