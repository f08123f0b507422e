"""``ViewerConfig``: every option of ``slidemil view`` (the ``view`` section of a config file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from slidemil.config import StageConfig
from slidemil.heatmaps.config import ColourMap, Normalisation
from slidemil.readers.protocol import READER_HELP, ReaderName

LOCALHOST = "127.0.0.1"


class ViewerConfig(StageConfig):
    """Options of ``slidemil view`` (the ``view:`` section of a config file)."""

    host: str = Field(
        LOCALHOST,
        description="address to listen on; anything but 127.0.0.1 exposes the slides to others",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    run: Path | None = Field(
        None,
        description="training run the predictions came from (default: the one they record); "
        "names the model and encoder on each slide page",
    )
    cohort: Path | None = Field(
        None, description="cohort CSV giving slide paths (when slides moved since prediction)"
    )
    normalisation: Normalisation = Field(
        "rank", description="how scores map to colours: rank, percentile (1-99 clip), minmax, none"
    )
    cmap: ColourMap = Field("jet", description="matplotlib colour map of the attention layer")
    smooth: float = Field(
        0.0, ge=0, description="Gaussian smoothing sigma of the attention layer, in patch sides"
    )
    top_k: int = Field(8, ge=1, le=100, description="patches in each row of the gallery")
    tile_size: int = Field(254, ge=64, le=2048, description="deep-zoom tile side in px")
    tile_cache_mb: int = Field(
        256, ge=0, description="memory for recently served tiles, in MB (0 = no cache)"
    )
    page_size: int = Field(50, ge=1, le=1000, description="slides per page of the slide list")
    reader: ReaderName = Field("auto", description=READER_HELP)
