"""``slidemil heatmap``: attention files + slides -> figures, galleries and viewer exports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from slidemil import atomic
from slidemil.atomic import is_temp_file
from slidemil.cohort import load_cohort
from slidemil.config import build, write_resolved
from slidemil.errors import ArtifactError, ConfigError, SlidemilError
from slidemil.formats.attention_file import (
    AttentionMap,
    read_attention_attrs,
    read_attention_file,
)
from slidemil.heatmaps.config import HeatmapConfig
from slidemil.heatmaps.export import heat_grid, write_geojson, write_heatmap_tiff
from slidemil.heatmaps.figure import gallery_figure, heatmap_figure, heatmap_title, save_figure
from slidemil.heatmaps.maps import ScoreMap, chosen_maps, map_scores
from slidemil.heatmaps.render import colorize, normalise_scores, overlay, rasterise, smooth
from slidemil.inputs import slide_file_problem
from slidemil.runner import RunSummary, Shard, Task, options_fingerprint, plan_slides
from slidemil.slide import Slide

CONFIG_NAME = "heatmap_config.yaml"
# Options that change which slides are drawn or how the run goes, not what a drawing looks like.
RUNTIME_OPTIONS = frozenset({"cohort", "shard", "workers", "quiet", "strict"})


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
    to ``predictions/heatmaps``. ``class_name`` draws one class's scores instead of the
    attention weights (``"predicted"``: each slide's predicted class; ``"all"``: one set of
    outputs per class, ``<slide_id>_<class>.png`` ..., where the scores are class-specific); a
    class the files lack is a :class:`ConfigError` before any drawing. Finished slides are
    skipped on a rerun with the same options;
    with other drawing options (or a new attention file) a slide is drawn again, also when an
    earlier run with those options was interrupted: each slide's outputs count as done only
    with the options fingerprint they were drawn with (``out/.done/<slide_id>.json``). A slide
    whose attention file or slide file is missing or unreadable is recorded in
    ``out/failures.csv`` and the others go on (``strict=True`` refuses the run instead).
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
    _check_class_choice(files, config.class_name)
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
    suffixes = [".png"]
    suffixes += ["_gallery.png"] if config.top_k > 0 else []
    suffixes += [".geojson"] if config.geojson else []
    suffixes += [".tiff"] if config.tiff else []
    drawing = config.model_dump(mode="json", exclude=set(RUNTIME_OPTIONS))

    def stems(task: Task) -> list[str]:
        """The output stems of a slide's maps (none when its file cannot say: the input check
        records why)."""
        try:
            attrs = read_attention_attrs(task.args[0])
            maps = chosen_maps(attrs, task.slide_id, config.class_name, task.args[0])
        except SlidemilError:
            return []
        return [m.stem for m in maps]

    def is_done(task: Task) -> bool:
        names = stems(task)
        return bool(names) and all((out / f"{n}{s}").is_file() for n in names for s in suffixes)

    def fingerprint(task: Task) -> str:
        # the drawing options and the attention file drawn: new scores are drawn again too
        stat = Path(task.args[0]).stat()
        return options_fingerprint({**drawing, "attention": [stat.st_size, stat.st_mtime_ns]})

    plan = plan_slides(
        "heatmap", tasks, out_dir=out, is_done=is_done, check=_input_problem,
        fingerprint=fingerprint, strict=config.strict, source=attention_dir,
    )  # fmt: skip
    write_resolved(out / CONFIG_NAME, {"heatmap": config})

    def remove_temps(task: Task) -> None:  # a killed run's, for a slide this process now holds
        for stem in {task.slide_id, *stems(task)}:
            atomic.remove_temps(out, stem)
            atomic.remove_temps(out, f"{stem}_gallery")

    return plan.run(
        render_slide, workers=min(config.workers, os.cpu_count() or 1), quiet=config.quiet,
        cleanup=remove_temps,
    )  # fmt: skip


def _input_problem(task: Task) -> SlidemilError | None:
    """Why a slide cannot be drawn: its attention file is unreadable or names no slide, or the
    slide file is missing, empty or unreadable; ``None`` when both look usable."""
    attention_path, slide_path = task.args[0], task.args[1]
    try:
        attrs = read_attention_attrs(attention_path)
    except SlidemilError as e:
        return e
    try:
        chosen_maps(attrs, task.slide_id, task.args[4].class_name, attention_path)
    except SlidemilError as e:
        return e
    slide_path = slide_path or attrs.get("slide_path")
    if not slide_path:
        return ArtifactError(attention_path, "records no slide path", "pass --cohort CSV")
    return slide_file_problem(slide_path)


def _check_class_choice(files: list[Path], class_name: str | None) -> None:
    """Refuse a class that the run does not have (checked on the first readable file: every
    file of one predictions folder has the run's classes), before any drawing."""
    if class_name is None:
        return
    for file in files:
        try:
            attrs = read_attention_attrs(file)
        except SlidemilError:
            continue  # a bad file is a bad row, recorded later
        try:
            chosen_maps(attrs, file.stem, class_name, file)
        except ArtifactError as e:
            raise ConfigError(None, f"--class {class_name}: {e}") from e
        return


def render_slide(
    slide_id: str,
    attention_path: str,
    slide_path: str | None,
    slide_mpp: float | None,
    out: str,
    config: HeatmapConfig,
) -> dict[str, str]:
    """All heat-map outputs of one slide, for each map its ``class_name`` asks for (a
    worker-process function)."""
    attention = read_attention_file(attention_path)
    attention.check_placeable()  # features without a patch geometry: only the map fails
    attrs = attention.attrs
    maps = chosen_maps(attrs, slide_id, config.class_name, attention_path)
    slide_path = slide_path or attrs.get("slide_path")
    if not slide_path:
        raise ArtifactError(attention_path, "records no slide path", "pass --cohort CSV")
    written = {}
    mpp_override = slide_mpp or attrs.get("slide_mpp")
    with Slide(slide_path, mpp_override=mpp_override, reader=config.reader) as slide:
        thumb, downsample = slide.thumbnail(config.thumbnail_size)
        for score_map in maps:
            outputs = _render_map(attention, score_map, slide, thumb, downsample, Path(out), config)
            key = "" if score_map.stem == slide_id else f"{score_map.class_name}:"
            written.update({f"{key}{kind}": path for kind, path in outputs.items()})
    return written


def _render_map(
    attention: AttentionMap,
    score_map: ScoreMap,
    slide: Slide,
    thumb: np.ndarray,
    downsample: float,
    out_dir: Path,
    config: HeatmapConfig,
) -> dict[str, str]:
    """The outputs of one map (figure, gallery, GeoJSON, TIFF) named from its stem."""
    scores, raw = map_scores(attention, score_map, config.model)
    shown = normalise_scores(scores, config.normalisation)
    size0 = attention.patch_size_level0
    stem = score_map.stem
    title = heatmap_title(attention.attrs.get("slide_id") or stem, attention.attrs)
    if score_map.class_name is not None:
        title = f"{title}; {score_map.label}"
    written = {}
    canvas = rasterise(attention.coords, shown, size0, thumb.shape[:2], downsample)
    canvas = smooth(canvas, config.smooth * size0 / downsample)
    image = overlay(thumb, colorize(canvas, config.cmap), config.alpha)
    label = f"{score_map.label} ({config.normalisation})"
    figure = heatmap_figure(image, title, config.cmap, label)
    written["png"] = str(save_figure(figure, out_dir / f"{stem}.png"))
    if config.top_k > 0:
        figure = gallery_figure(*_gallery(slide, attention, scores, config.top_k), title)
        written["gallery"] = str(save_figure(figure, out_dir / f"{stem}_gallery.png"))
    if config.geojson:
        if score_map.class_name is None:
            measurements = {"attention": scores, "attention_raw": raw, "attention_shown": shown}
        else:
            name = f"{score_map.method} {score_map.class_name}"
            measurements = {name: scores, f"{name} shown": shown}
        written["geojson"] = str(
            write_geojson(out_dir / f"{stem}.geojson", attention.coords, size0, measurements)
        )
    if config.tiff:
        grid, cell = heat_grid(attention.coords, shown, size0, slide.dimensions, config.smooth)
        tiff = write_heatmap_tiff(
            out_dir / f"{stem}.tiff", slide, grid, cell, cmap=config.cmap, alpha=config.alpha
        )
        written["tiff"] = str(tiff)
    return written


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
        pixels = slide.read_patches(attention.coords[indices], level, read_size, patch_size)
        return [(image, float(scores[i])) for image, i in zip(pixels, indices, strict=True)]

    k = min(k, len(order))
    return patches(order[:k]), patches(order[::-1][:k])
