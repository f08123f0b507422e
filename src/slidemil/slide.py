"""Slide access: one narrow interface over the slide readers.

Coordinates follow OpenSlide: ``(x, y)`` locations are always level-0 pixels, sizes are pixels at
the level being read. Physical resolution is in µm/px ("mpp"). Everything a stage needs from a
slide goes through :class:`Slide`, which opens the file with
:func:`~slidemil.readers.pick_reader` (the raw-tile reader for tiled TIFF/SVS, OpenSlide for the
rest) and adds what the stages need on top: µm/px with overrides, level choice, scaled reads,
thumbnails and batches of resized patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slidemil.errors import MissingMppError
from slidemil.readers.choice import ReaderName, pick_reader
from slidemil.readers.patches import read_patches, resize_patch
from slidemil.readers.pixels import to_float

PROPERTY_OBJECTIVE_POWER = "openslide.objective-power"
PROPERTY_VENDOR = "openslide.vendor"

# Downsamples within this relative tolerance of a level count as that level (pyramids built by
# rounding dimensions report 3.9998 instead of 4).
LEVEL_TOLERANCE = 1e-2

# Longest side (px at the level read) fetched by one read_region call; bigger reads go block by
# block. 1024² px is 4 MB of RGBA from OpenSlide.
REGION_CHUNK = 1024

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
    """A whole-slide image.

    Args:
        path: the slide file (any format OpenSlide reads: .svs, .tif, .ndpi, .mrxs, ...).
        mpp_override: level-0 µm/px to use instead of (or in the absence of) the file's metadata.
        reader: ``auto`` (the raw-tile reader where the file allows, else OpenSlide),
            ``openslide`` or ``tiles`` (see :func:`~slidemil.readers.pick_reader`).
    """

    def __init__(
        self, path: str | Path, mpp_override: float | None = None, reader: ReaderName = "auto"
    ):
        self.path = Path(path)
        if mpp_override is not None and not mpp_override > 0:
            raise MissingMppError(self.path, f"µm/px override must be positive, got {mpp_override}")
        self._reader = pick_reader(self.path, reader)  # SlideOpenError when it cannot
        self._mpp_override = mpp_override

    # -- geometry -------------------------------------------------------------------------------
    @property
    def reader_name(self) -> str:
        """The reader in use: ``"tiles"`` or ``"openslide"`` (for provenance)."""
        return self._reader.name

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in px."""
        return self._reader.dimensions

    @property
    def level_count(self) -> int:
        return len(self._reader.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._reader.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._reader.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return self._reader.properties

    @property
    def vendor(self) -> str | None:
        return self.properties.get(PROPERTY_VENDOR)

    # -- physical resolution ----------------------------------------------------------------------
    @property
    def mpp_or_none(self) -> float | None:
        """Level-0 µm/px: the override, else the file's metadata, else ``None``."""
        if self._mpp_override is not None:
            return float(self._mpp_override)
        return self._reader.mpp

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
        return to_float(self.properties.get(PROPERTY_OBJECTIVE_POWER))

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
        return self._reader.read_region(location, level, size)

    def read_patches(
        self, coords: np.ndarray, level: int, read_size: int, patch_size: int
    ) -> np.ndarray:
        """RGB uint8 (N, patch_size, patch_size, 3): ``read_size`` px squares at ``level`` from
        each level-0 (x, y) of ``coords``, read in one batch (each stored tile decoded once) and
        resized to ``patch_size`` px (area averaging when shrinking)."""
        return read_patches(self._reader, coords, level, read_size, patch_size)

    def read_scaled(
        self, location: tuple[int, int], plan: ReadPlan, size: tuple[int, int]
    ) -> np.ndarray:
        """``size`` px at ``plan``'s target resolution, read from ``plan.level`` and resized.

        A region larger than ``REGION_CHUNK`` px a side at ``plan.level`` is read block by block
        (each block resized with area interpolation and pasted), so memory holds the output and
        one block, never the whole region: a thumbnail of a flat 100k x 100k px slide needs tens of
        MB, not tens of GB.
        """
        width, height = int(size[0]), int(size[1])
        read_size = (math.ceil(width * plan.scale), math.ceil(height * plan.scale))
        if max(read_size) > REGION_CHUNK:
            return self._read_scaled_in_blocks(location, plan, (width, height))
        if plan.scale == 1.0:
            return self.read_region(location, plan.level, (width, height))
        region = self.read_region(location, plan.level, read_size)
        return resize_patch(region, (width, height))

    def _read_scaled_in_blocks(
        self, location: tuple[int, int], plan: ReadPlan, size: tuple[int, int]
    ) -> np.ndarray:
        width, height = size
        scale = plan.scale
        # output px per block side, so that one block reads at most REGION_CHUNK px a side
        block = max(1, math.floor(REGION_CHUNK / max(scale, 1.0)))
        # blocks are placed in plan.level's own px, so none is shifted by a fraction of a px
        level_x = round(int(location[0]) / plan.level_downsample)
        level_y = round(int(location[1]) / plan.level_downsample)
        out = np.empty((height, width, 3), np.uint8)
        for y in range(0, height, block):
            for x in range(0, width, block):
                w, h = min(block, width - x), min(block, height - y)
                # the block's footprint at plan.level, widened to whole px
                sx0, sy0 = math.floor(x * scale), math.floor(y * scale)
                sx1, sy1 = math.ceil((x + w) * scale), math.ceil((y + h) * scale)
                region = self._reader.read_level_region(
                    plan.level, (level_x + sx0, level_y + sy0), (sx1 - sx0, sy1 - sy0)
                )
                out[y : y + h, x : x + w] = resize_patch(region, (w, h))
        return out

    def read_level(self, level: int) -> np.ndarray:
        """The whole of ``level`` as RGB (read block by block: memory is the output's size)."""
        plan = ReadPlan(level=level, level_downsample=self.level_downsamples[level], scale=1.0)
        return self.read_scaled((0, 0), plan, self.level_dimensions[level])

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is at most ``max_size`` px, and its downsample (level-0
        px per thumbnail px).

        Read from the deepest level finer than the thumbnail, block by block: on a single-level
        (flat) slide that is level 0, and memory stays bounded whatever its size.
        """
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
        self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = self.mpp_or_none
        return (
            f"Slide({self.path.name!r}, {w}x{h}, levels={self.level_count}, mpp={mpp}, "
            f"reader={self.reader_name!r})"
        )
