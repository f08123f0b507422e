"""``HeatmapConfig``: every option of ``slidemil heatmap`` (the ``heatmap`` section of a config)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from slidemil.config import ShardSpec, StageConfig
from slidemil.readers.protocol import READER_HELP, ReaderName


def _known_cmap(value: str) -> str:
    import matplotlib  # here, so that --help does not import it

    if value not in matplotlib.colormaps:
        raise ValueError(f"unknown colour map {value!r} (e.g. jet, viridis, inferno, coolwarm)")
    return value


# A matplotlib colour map name (heat maps and the viewer's attention layer).
ColourMap = Annotated[str, AfterValidator(_known_cmap)]
# How attention scores map to colours.
Normalisation = Literal["rank", "percentile", "minmax", "none"]


class HeatmapConfig(StageConfig):
    """Options of ``slidemil heatmap`` (the ``heatmap:`` section of a config file)."""

    normalisation: Normalisation = Field(
        "rank", description="how scores map to colours: rank, percentile (1-99 clip), minmax, none"
    )
    model: str = Field(
        "mean", description="which model's attention: 'mean' over folds, or a name like fold_0"
    )
    class_name: str | None = Field(
        None,
        description="which class's patch scores to draw: a class name, 'predicted' (each "
        "slide's predicted class) or 'all' (one map per class, <slide_id>_<class>.*, where the "
        "scores are class-specific); default: the attention weights (--explain attention) or "
        "the predicted class's scores (--explain ig)",
    )
    cmap: ColourMap = Field("jet", description="matplotlib colour map")
    alpha: float = Field(0.5, ge=0, le=1, description="opacity of the heat map over the slide")
    smooth: float = Field(
        0.0, ge=0, description="Gaussian smoothing sigma, in patch sides (0 = none)"
    )
    thumbnail_size: int = Field(
        2048, ge=128, le=20000, description="longer side of the overview figure in px"
    )
    top_k: int = Field(8, ge=0, description="patches in each row of the gallery (0 = none)")
    geojson: bool = Field(True, description="write QuPath GeoJSON tiles with the scores")
    tiff: bool = Field(
        False, description="write a full-resolution pyramidal TIFF overlay (slow on huge slides)"
    )
    cohort: Path | None = Field(
        None, description="cohort CSV giving slide paths (when slides moved since prediction)"
    )
    shard: ShardSpec = Field(None, description="i/n: process every n-th slide from the i-th")
    workers: int = Field(1, ge=1, description="slides rendered in parallel")
    strict: bool = Field(
        False,
        description="refuse the run when any attention file or slide is missing or unreadable, "
        "instead of recording it in failures.csv and going on",
    )
    quiet: bool = Field(False, description="no progress bar")
    reader: ReaderName = Field("auto", description=READER_HELP)
