"""What every slide reader offers: the narrow seam between the stages and a file's pixels.

Coordinates follow OpenSlide: a location ``(x, y)`` is in level-0 px, a size is in px at the
level read. Pixels come back as RGB uint8, transparent areas (outside the scanned image)
composited on white, so every reader returns the same array for the same request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np

# ``auto``: the raw-tile reader where the file allows, else OpenSlide (see ``pick_reader``).
ReaderName = Literal["auto", "openslide", "tiles"]
READER_HELP = (
    "slide reader: auto (raw tiles where the file allows, else OpenSlide), openslide, tiles"
)


@runtime_checkable
class SlideReader(Protocol):
    """One open slide file.

    ``name`` says which reader it is (``"openslide"`` or ``"tiles"``) for provenance, and
    ``structure`` what the reader found in the file (e.g. ``"aperio"``, ``"generic-tiff"``).
    """

    name: str
    structure: str

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in px."""
        ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) in px of every pyramid level, finest first."""
        ...

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 px per px of every level (OpenSlide's definition, from the image sizes)."""
        ...

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's property map of the file (``openslide.mpp-x``, ``tiff.*``, ...)."""
        ...

    @property
    def mpp(self) -> float | None:
        """Level-0 µm/px recorded in the file, or ``None`` when it records none."""
        ...

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3): ``size`` (w, h) px at ``level``, top-left at level-0 ``location``.

        Transparent pixels (outside the scanned image) come back white.
        """
        ...

    def read_regions(
        self, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (N, h, w, 3): one region per level-0 location, all of ``size`` at ``level``.

        A reader decodes each stored tile once for neighbouring regions of the same call.
        """
        ...

    def read_level_region(
        self, level: int, origin: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``level``'s own px from ``origin`` (x, y in that level's px).

        For whole-level reads (thumbnails, segmentation images) block by block: a block's
        origin is a level pixel, so no block is resampled by a fraction of a pixel, as level-0
        origins on a level whose downsample is not a whole number would be.
        """
        ...

    def close(self) -> None:
        """Release the file."""
        ...
