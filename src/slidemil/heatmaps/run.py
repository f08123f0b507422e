"""``slidemil heatmap``: attention files + slides -> figures, galleries and viewer exports."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from slidemil.atomic import is_temp_file
from slidemil.cohort import load_cohort
from slidemil.config import build, read_yaml, write_resolved
from slidemil.errors import ArtifactError, ConfigError
from slidemil.formats.attention_file import read_attention_file
from slidemil.heatmaps.config import HeatmapConfig
from slidemil.heatmaps.export import heat_grid, write_geojson, write_heatmap_tiff
from slidemil.heatmaps.figure import gallery_figure, heatmap_figure, heatmap_title, save_figure
from slidemil.heatmaps.render import colorize, normalise_scores, overlay, rasterise, smooth
from slidemil.runner import RunSummary, Shard, Task, run_per_slide
from slidemil.slide import Slide

CONFIG_NAME = "heatmap_config.yaml"
# Options that change which slides are drawn or how the run goes, not what a drawing looks like.
RUNTIME_OPTIONS = frozenset({"cohort", "shard", "workers", "quiet"})


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
    to ``predictions/heatmaps``. Finished slides are skipped on a rerun with the same options;
    with other drawing options every slide is drawn again.
    """
    config = config or build(
        HeatmapConfig, section="heatmap", config_file=config_file, overrides=options
    )
    predictions = Path(predictions)
    out = Path(out) if out is not None else predictions / "heatmaps"
    attention_dir = predictions / "attention"
    found = sorted(attention_dir.glob("*.h5")) if attention_dir.is_dir() else []
    files = [f for f in found if not is_temp_file(f)]
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
    # outputs drawn with other options are redrawn, not kept: trying another look is cheap
    redraw = _options_changed(out / CONFIG_NAME, config)
    write_resolved(out / CONFIG_NAME, {"heatmap": config})
    suffixes = [".png"]
    suffixes += ["_gallery.png"] if config.top_k > 0 else []
    suffixes += [".geojson"] if config.geojson else []
    suffixes += [".tiff"] if config.tiff else []

    def is_done(task: Task) -> bool:
        return not redraw and all((out / f"{task.slide_id}{s}").is_file() for s in suffixes)

    return run_per_slide(
        "heatmap",
        tasks,
        render_slide,
        out_dir=out,
        is_done=is_done,
        workers=min(config.workers, os.cpu_count() or 1),
        quiet=config.quiet,
    )


def _options_changed(record: Path, config: HeatmapConfig) -> bool:
    """True when ``record`` holds options that draw differently from ``config``."""
    if not record.is_file():
        return False
    try:
        previous = read_yaml(record).get("heatmap") or {}
    except ConfigError:
        return True
    current = config.model_dump(mode="json")
    return any(previous.get(k) != v for k, v in current.items() if k not in RUNTIME_OPTIONS)


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
    scores, raw = _scores(attention, config.model, attention_path)
    shown = normalise_scores(scores, config.normalisation)
    slide_path = slide_path or attrs.get("slide_path")
    if not slide_path:
        raise ArtifactError(attention_path, "records no slide path", "pass --cohort CSV")
    out_dir = Path(out)
    size0 = attention.patch_size_level0
    title = heatmap_title(slide_id, attrs)
    written = {}
    with Slide(slide_path, mpp_override=slide_mpp or attrs.get("slide_mpp")) as slide:
        thumb, downsample = slide.thumbnail(config.thumbnail_size)
        canvas = rasterise(attention.coords, shown, size0, thumb.shape[:2], downsample)
        canvas = smooth(canvas, config.smooth * size0 / downsample)
        image = overlay(thumb, colorize(canvas, config.cmap), config.alpha)
        figure = heatmap_figure(image, title, config.cmap, f"attention ({config.normalisation})")
        written["png"] = str(save_figure(figure, out_dir / f"{slide_id}.png"))
        if config.top_k > 0:
            figure = gallery_figure(*_gallery(slide, attention, scores, config.top_k), title)
            written["gallery"] = str(save_figure(figure, out_dir / f"{slide_id}_gallery.png"))
        if config.geojson:
            measurements = {"attention": scores, "attention_raw": raw, "attention_shown": shown}
            written["geojson"] = str(
                write_geojson(
                    out_dir / f"{slide_id}.geojson", attention.coords, size0, measurements
                )
            )
        if config.tiff:
            grid, cell = heat_grid(attention.coords, shown, size0, slide.dimensions, config.smooth)
            tiff = write_heatmap_tiff(
                out_dir / f"{slide_id}.tiff",
                slide,
                grid,
                cell,
                cmap=config.cmap,
                alpha=config.alpha,
            )
            written["tiff"] = str(tiff)
    return written


def _scores(attention, model: str, path) -> tuple[np.ndarray, np.ndarray]:
    """(N,) attention and raw scores of ``model``: one fold's columns, or the mean over all."""
    if model == "mean":
        return attention.mean_attention(), attention.attention_raw.mean(axis=1)
    names = attention.attrs.get("models") or []
    if model not in names:
        raise ArtifactError(
            path, f"no attention of model {model!r}; it has {', '.join(names) or 'none'}",
            "choose one of those with --model, or 'mean'",
        )  # fmt: skip
    column = names.index(model)
    return attention.attention[:, column], attention.attention_raw[:, column]


def _gallery(slide: Slide, attention, scores: np.ndarray, k: int):
    """The ``k`` highest- and lowest-scoring patches as (pixels, score), read as the encoder saw
    them (at the recorded read level and size, resized to the patch size)."""
    attrs = attention.attrs
    size0 = attention.patch_size_level0
    if attrs.get("read_level") is not None and attrs.get("read_size"):
        level, read_size = int(attrs["read_level"]), int(attrs["read_size"])
    else:  # level 0 always works when a file does not say how its patches were read
        level, read_size = 0, max(1, round(size0))
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
