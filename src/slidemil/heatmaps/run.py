"""``slidemil heatmap``: attention files + slides -> figures, galleries and viewer exports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from slidemil.cohort import load_cohort
from slidemil.config import StageConfig, build, write_resolved
from slidemil.errors import ArtifactError
from slidemil.formats.attention_file import read_attention_file
from slidemil.heatmaps.export import heat_grid, write_geojson, write_heatmap_tiff
from slidemil.heatmaps.figure import gallery_figure, heatmap_figure, save_figure
from slidemil.heatmaps.render import colorize, normalise_scores, overlay, rasterise, smooth
from slidemil.runner import RunSummary, Shard, Task, run_per_slide
from slidemil.slide import Slide


class HeatmapConfig(StageConfig):
    normalisation: Literal["rank", "percentile", "minmax", "none"] = Field(
        "rank", description="how scores map to colours: rank, percentile (1-99 clip), minmax, none"
    )
    model: str = Field(
        "mean", description="which model's attention: 'mean' over folds, or a name like fold_0"
    )
    cmap: str = Field("jet", description="matplotlib colour map")
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
    shard: str | None = Field(None, description="i/n: process every n-th slide from the i-th")
    workers: int = Field(1, ge=1, description="slides rendered in parallel")
    quiet: bool = Field(False, description="no progress bar")


def heatmap(
    predictions: str | Path,
    out: str | Path | None = None,
    config: HeatmapConfig | None = None,
    config_file: str | Path | None = None,
    **options,
) -> RunSummary:
    """Render heat maps for every attention file under ``predictions/attention``.

    Writes ``out/<slide_id>.png`` (overlay, colour bar, predicted class in the title),
    ``<slide_id>_gallery.png`` (top- and bottom-k patches), ``<slide_id>.geojson`` (QuPath tiles)
    and, with ``tiff=True``, ``<slide_id>.tiff`` (pyramidal, full resolution). ``out`` defaults
    to ``predictions/heatmaps``. Finished slides are skipped on a rerun.
    """
    config = config or build(
        HeatmapConfig, section="heatmap", config_file=config_file, overrides=options
    )
    predictions = Path(predictions)
    out = Path(out) if out is not None else predictions / "heatmaps"
    attention_dir = predictions / "attention"
    files = sorted(attention_dir.glob("*.h5")) if attention_dir.is_dir() else []
    if not files:
        raise ArtifactError(attention_dir, "no attention files", "run slidemil predict first")
    paths = {}
    if config.cohort is not None:
        cohort = load_cohort(config.cohort, require_labels=False, check_files=False)
        paths = {r.slide_id: (str(r.path), r.slide_mpp) for r in cohort}
    tasks = []
    for file in Shard.parse(config.shard).select(files):
        slide_id = file.stem
        slide_path, slide_mpp = paths.get(slide_id, (None, None))
        tasks.append(
            Task(slide_id, str(file), (str(file), slide_path, slide_mpp, str(out), config))
        )
    write_resolved(out / "heatmap_config.yaml", {"heatmap": config})
    suffixes = (
        [".png"] + ([".geojson"] if config.geojson else []) + ([".tiff"] if config.tiff else [])
    )

    def is_done(task: Task) -> bool:
        return all((out / f"{task.slide_id}{s}").is_file() for s in suffixes)

    return run_per_slide(
        "heatmap",
        tasks,
        render_slide,
        out_dir=out,
        is_done=is_done,
        workers=min(config.workers, os.cpu_count() or 1),
        quiet=config.quiet,
    )


def render_slide(
    slide_id: str,
    attention_path: str,
    slide_path: str | None,
    slide_mpp: float | None,
    out: str,
    config: HeatmapConfig,
) -> dict[str, str]:
    """All heat-map outputs of one slide (a worker-process function)."""
    attention = read_attention_file(attention_path)
    attrs = attention.attrs
    scores = _scores(attention, config.model, attention_path)
    shown = normalise_scores(scores, config.normalisation)
    slide_path = slide_path or attrs.get("slide_path")
    if not slide_path:
        raise ArtifactError(attention_path, "records no slide path", "pass --cohort CSV")
    out_dir = Path(out)
    size0 = attention.patch_size_level0
    written = {}
    with Slide(slide_path, mpp_override=slide_mpp or attrs.get("slide_mpp")) as slide:
        thumb, downsample = slide.thumbnail(config.thumbnail_size)
        canvas = rasterise(attention.coords, shown, size0, thumb.shape[:2], downsample)
        canvas = smooth(canvas, config.smooth * size0 / downsample)
        image = overlay(thumb, colorize(canvas, config.cmap), config.alpha)
        written["png"] = str(
            save_figure(
                heatmap_figure(image, _title(slide_id, attrs), config.cmap),
                out_dir / f"{slide_id}.png",
            )
        )
        if config.top_k > 0:
            figure = gallery_figure(*_gallery(slide, attention, scores, config.top_k), slide_id)
            written["gallery"] = str(save_figure(figure, out_dir / f"{slide_id}_gallery.png"))
        if config.geojson:
            measurements = {"attention": scores, "attention_display": shown}
            written["geojson"] = str(
                write_geojson(
                    out_dir / f"{slide_id}.geojson", attention.coords, size0, measurements
                )
            )
        if config.tiff:
            step0 = float(attrs.get("step") or attrs.get("patch_size") or 0) * float(
                attrs.get("target_downsample") or 1
            )
            grid, cell = heat_grid(
                attention.coords, shown, size0, step0 or size0, slide.dimensions, config.smooth
            )
            written["tiff"] = str(
                write_heatmap_tiff(
                    out_dir / f"{slide_id}.tiff",
                    slide,
                    grid,
                    cell,
                    cmap=config.cmap,
                    alpha=config.alpha,
                )
            )
    return written


def _scores(attention, model: str, path) -> np.ndarray:
    if model == "mean":
        return attention.mean_attention()
    names = attention.attrs.get("models") or []
    if model not in names:
        raise ArtifactError(path, f"no attention of model {model!r}; it has {names}")
    return attention.attention[:, names.index(model)]


def _title(slide_id: str, attrs: dict) -> str:
    predicted = attrs.get("predicted")
    probabilities = attrs.get("probabilities")
    classes = attrs.get("class_names") or []
    if predicted is None or not probabilities or predicted not in classes:
        return slide_id
    probability = probabilities[classes.index(predicted)]
    return f"{slide_id}: predicted {predicted} (p = {probability:.2f})"


def _gallery(slide: Slide, attention, scores: np.ndarray, k: int):
    attrs = attention.attrs
    level = int(attrs.get("read_level", 0))
    read_size = int(attrs.get("read_size") or round(attention.patch_size_level0))
    patch_size = int(attrs.get("patch_size") or read_size)
    order = np.argsort(-scores, kind="stable")

    def patches(indices):
        shown = []
        for i in indices:
            x, y = attention.coords[i]
            pixels = slide.read_region((int(x), int(y)), level, (read_size, read_size))
            if read_size != patch_size:
                pixels = cv2.resize(pixels, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
            shown.append((pixels, float(scores[i])))
        return shown

    k = min(k, len(order))
    return patches(order[:k]), patches(order[::-1][:k])
