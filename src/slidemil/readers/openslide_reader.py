"""The reference reader: OpenSlide, for every format it knows; its errors become ours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openslide

from slidemil.errors import SlideOpenError, SlideReadError
from slidemil.readers.pixels import composite_on_white, mpp_from_properties, regions_one_by_one


def open_openslide(path: Path) -> openslide.OpenSlide:
    """``openslide.OpenSlide(path)``, with OpenSlide's exceptions as :class:`SlideOpenError`."""
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideOpenError(path, "not a slide format OpenSlide can read") from e
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideOpenError(path, f"OpenSlide cannot open it: {e}") from e


class OpenSlideReader:
    """A slide read through ``openslide.OpenSlide.read_region``.

    Args:
        path: any file OpenSlide reads (.svs, .tif, .ndpi, .mrxs, .scn, DICOM, ...).
    """

    name = "openslide"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._osr = open_openslide(self.path)
        self.structure = self._osr.properties.get(openslide.PROPERTY_NAME_VENDOR) or "unknown"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._osr.dimensions

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
    def mpp(self) -> float | None:
        return mpp_from_properties(self._osr.properties)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3); transparent pixels (outside the scanned area) come back white."""
        levels = self._osr.level_count
        if not 0 <= int(level) < levels:  # OpenSlide would return a transparent region
            raise SlideReadError(
                self.path, f"level {level} does not exist (the slide has {levels})"
            )
        try:
            rgba = self._osr.read_region(
                (int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))
            )
        except openslide.OpenSlideError as e:
            raise SlideReadError(
                self.path, f"cannot read region at {tuple(location)} level {level}: {e}"
            ) from e
        return composite_on_white(np.asarray(rgba))

    def read_regions(
        self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (N, h, w, 3), one ``read_region`` per location (OpenSlide caches tiles)."""
        return regions_one_by_one(self.read_region, locations, level, size)

    def read_level_region(
        self, level: int, origin: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) from level px ``origin``: OpenSlide takes level-0 origins only,
        so the nearest one (within a level px of the asked one)."""
        level = int(level)
        valid = 0 <= level < self._osr.level_count  # read_region reports a bad level
        downsample = self._osr.level_downsamples[level] if valid else 1.0
        location = (round(int(origin[0]) * downsample), round(int(origin[1]) * downsample))
        return self.read_region(location, level, size)

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
