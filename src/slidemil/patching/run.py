"""``slidemil patch``: tissue and patch coordinates for every slide of a cohort.

Outputs under the work folder::

    cohort.csv                  the validated manifest (absolute paths)
    patch_config.yaml           the resolved options of the run
    patches/<slide_id>.h5       patch coordinates (see slidemil.formats.patch_file)
    patches/failures.csv        one row per slide that failed (or bad row), with the reason
    patches/.done/<slide_id>.json   the options fingerprint each patch file was made with
    previews/<slide_id>.jpg     thumbnail with tissue outlines and the patch grid
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import h5py
from pydantic import Field, model_validator

from slidemil import atomic
from slidemil.cohort import SlideRecord, load_cohort, row_problem
from slidemil.config import ShardSpec, StageConfig, build, read_yaml, write_resolved
from slidemil.errors import ConfigError, NoTissueError
from slidemil.formats.patch_file import PatchSet, is_complete_patch_file, write_patch_file
from slidemil.patching.grid import select_patches
from slidemil.patching.preview import PREVIEW_SUFFIX, draw_preview, write_preview
from slidemil.readers.protocol import READER_HELP, ReaderName
from slidemil.runner import RunSummary, Shard, Task, options_fingerprint, plan_slides
from slidemil.slide import Slide
from slidemil.tissue.segmentation import TissueMask, TissueParams, segment_tissue
from slidemil.tissue.segmentation import segmentation_level as nearest_level

CONFIG_NAME = "patch_config.yaml"
DEFAULT_MPP = 0.5
# A level whose longer side exceeds the target this many times is shrunk through a thumbnail.
MAX_SEGMENTATION_OVERSIZE = 4
# The segmentation image is fine enough that a patch side spans at least this many of its px,
# so each patch's tissue fraction is measured on a few dozen mask px at the least.
MIN_MASK_PX_PER_PATCH = 16
PREVIEW_SIZE = 1024  # longer side of previews/<slide_id>.jpg, px
# Options that only change how the run goes, not its result.
# "reader": both readers give the same pixels, so switching does not redo finished slides
RUN_ONLY_OPTIONS = frozenset(
    {"workers", "quiet", "shard", "overwrite", "previews", "strict", "reader"}
)


class PatchConfig(StageConfig):
    """Options of ``slidemil patch`` (the ``patch:`` section of a config file)."""

    mpp: float | None = Field(
        None, gt=0, description="patch resolution in µm/px (0.5 if neither this nor magnification)"
    )
    magnification: float | None = Field(
        None, gt=0, description="patch resolution as objective magnification, e.g. 20"
    )
    patch_size: int = Field(256, ge=8, description="patch side in px at the patch resolution")
    step: int | None = Field(
        None, ge=1, description="px between patch origins at the patch resolution (overlap if < "
        "patch size) [default: patch size]",
    )  # fmt: skip
    min_tissue: float = Field(
        0.5, ge=0.0, le=1.0, description="tissue fraction a patch needs to be kept"
    )
    slide_mpp: float | None = Field(
        None, gt=0, description="level-0 µm/px for slides without it (a cohort 'slide_mpp' wins)"
    )
    seg_mpp: float = Field(
        4.0, gt=0, description="µm/px of the image tissue is segmented on (finer where a patch "
        f"would span under {MIN_MASK_PX_PER_PATCH} of its px, coarser on slides past --seg-size)",
    )  # fmt: skip
    seg_size: int = Field(
        2048, ge=128, description="most px on the longer side of the segmentation image"
    )
    sthresh: int = Field(8, ge=0, le=255, description="saturation threshold (0-255)")
    sthresh_up: int = Field(255, ge=1, le=255, description="value of tissue in the threshold")
    mthresh: int = Field(7, ge=1, description="median blur kernel (px at the segmentation size)")
    close: int = Field(4, ge=0, description="closing kernel (px at the segmentation size), 0: off")
    use_otsu: bool = Field(False, description="Otsu threshold (never below sthresh)")
    min_tissue_area_um2: float = Field(
        10_000.0, ge=0, description="smallest tissue piece kept, net of holes, in µm² (CLAM a_t)"
    )
    min_hole_area_um2: float = Field(
        2_000.0, ge=0, description="smallest hole kept out of the tissue, in µm² (CLAM a_h)"
    )
    max_n_holes: int = Field(8, ge=0, description="most holes per tissue piece")
    previews: bool = Field(True, description="write previews/<slide_id>.jpg")
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="slides patched in parallel"
    )
    shard: ShardSpec = Field(None, description="only shard i/n of the slides (0-based), e.g. 0/4")
    overwrite: bool = Field(False, description="redo every slide, even with other options")
    strict: bool = Field(
        False,
        description="refuse the whole cohort when any row is bad (slide or mask missing, empty, "
        "unreadable) instead of recording it in failures.csv and going on",
    )
    quiet: bool = Field(False, description="no progress bar")
    reader: ReaderName = Field("auto", description=READER_HELP)

    @model_validator(mode="after")
    def _one_resolution(self) -> PatchConfig:
        if self.mpp is not None and self.magnification is not None:
            raise ValueError("give mpp or magnification, not both")
        return self

    @property
    def tissue_params(self) -> TissueParams:
        names = TissueParams.__dataclass_fields__
        return TissueParams(**{name: getattr(self, name) for name in names})

    def result_options(self) -> dict[str, Any]:
        """The options that change the patch files (compared against an existing work folder)."""
        values = self.model_dump(mode="json", exclude=set(RUN_ONLY_OPTIONS))
        if values["mpp"] is None and values["magnification"] is None:
            values["mpp"] = DEFAULT_MPP
        return values


@dataclass
class PatchSummary:
    """What :func:`patch` did: the runner's summary and the patch count of every finished slide."""

    run: RunSummary
    patch_counts: dict[str, int] = field(default_factory=dict)
    out: Path | None = None

    @property
    def failed(self) -> dict[str, str]:
        return self.run.failed

    def line(self) -> str:
        total = sum(self.patch_counts.values())
        return f"{self.run.line()}; {total} patches in {len(self.patch_counts)} slides"


def patch(
    cohort_csv: str | Path,
    out: str | Path,
    config: PatchConfig | None = None,
    *,
    config_file: str | Path | None = None,
    **options: Any,
) -> PatchSummary:
    """Segment tissue and write patch coordinates for every slide of ``cohort_csv`` under ``out``.

    Options are :class:`PatchConfig` fields, e.g. ``patch("cohort.csv", "work", mpp=0.5)``.
    Slides whose patch file is complete and was made with the same options are skipped (an
    interrupted ``overwrite`` run resumes without keeping old-options files); a failing slide,
    or a bad row (slide or mask file missing, a directory, empty, unreadable), is recorded in
    ``out/patches/failures.csv`` and the others go on (``strict=True`` refuses the cohort on
    a bad row instead). Several processes may share ``out``: each slide is locked while patched.
    """
    if config is None:
        config = build(PatchConfig, section="patch", config_file=config_file, overrides=options)
    out = Path(out)
    cohort = load_cohort(cohort_csv, require_labels=False, check_files=False)
    _check_same_options(out, config)
    records = {r.slide_id: r for r in Shard.parse(config.shard).select(list(cohort))}
    patch_dir = out / "patches"
    tasks = [_task(record, out, config) for record in records.values()]

    def is_done(task: Task) -> bool:
        return not config.overwrite and is_complete_patch_file(_patch_path(out, task.slide_id))

    # Bad rows are found (and --strict refuses) before anything is written.
    plan = plan_slides(
        "patch", tasks, out_dir=patch_dir, is_done=is_done,
        check=lambda task: row_problem(records[task.slide_id], open_slide=config.strict),
        fingerprint=lambda task: _fingerprint(records[task.slide_id], config),
        strict=config.strict, source=cohort_csv,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    cohort.save(out / "cohort.csv")
    write_resolved(out / CONFIG_NAME, {"patch": config})

    def remove_temps(task: Task) -> None:  # a killed run's, for a slide this process now holds
        atomic.remove_temps(patch_dir, task.slide_id)
        atomic.remove_temps(out / "previews", task.slide_id)

    summary = plan.run(
        patch_slide, workers=config.workers, quiet=config.quiet, cleanup=remove_temps
    )
    counts = {sid: int(n) for sid, n in summary.results.items()}
    for slide_id in summary.skipped:
        counts[slide_id] = _count_patches(_patch_path(out, slide_id))
    return PatchSummary(summary, counts, out)


def _fingerprint(record: SlideRecord, config: PatchConfig) -> str:
    """What a slide's patch file depends on: the result options and the row's own inputs."""
    slide_mpp = record.slide_mpp if record.slide_mpp is not None else config.slide_mpp
    mask = None if record.mask_path is None else str(record.mask_path)
    return options_fingerprint({**config.result_options(), "slide_mpp": slide_mpp, "mask": mask})


def _task(record: SlideRecord, out: Path, config: PatchConfig) -> Task:
    slide_mpp = record.slide_mpp if record.slide_mpp is not None else config.slide_mpp
    mask = None if record.mask_path is None else str(record.mask_path)
    return Task(
        record.slide_id, str(record.path), (str(record.path), mask, slide_mpp, config, str(out))
    )


def _patch_path(out: Path, slide_id: str) -> Path:
    return out / "patches" / f"{slide_id}.h5"


def _count_patches(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0])


def _check_same_options(out: Path, config: PatchConfig) -> None:
    """Refuse to mix patch files made with other options in one work folder."""
    record = out / CONFIG_NAME
    if config.overwrite or not record.is_file():
        return
    previous = read_yaml(record).get("patch") or {}
    try:
        previous_options = PatchConfig(**previous).result_options()
    except ValueError:
        previous_options = previous
    current = config.result_options()
    changed = sorted(k for k in current if previous_options.get(k) != current[k])
    if changed:
        shown = ", ".join(f"{k}: {previous_options.get(k)} -> {current[k]}" for k in changed)
        raise ConfigError(
            record,
            f"this work folder was patched with other options ({shown})",
            "use a new --out folder, the same options, or --overwrite to redo every slide",
        )


def patch_slide(
    slide_id: str,
    slide_path: str,
    mask_path: str | None,
    slide_mpp: float | None,
    config: PatchConfig,
    out: str,
) -> int:
    """Patch one slide: tissue, grid, patch file and preview. Returns the number of patches.

    Top-level so the runner's process pool can pickle it.
    """
    out_dir = Path(out)
    with Slide(slide_path, mpp_override=slide_mpp, reader=config.reader) as slide:
        level0_mpp = slide.mpp  # MissingMppError here, before any work
        if config.magnification is not None:
            target_mpp = slide.mpp_for_magnification(config.magnification)
        else:
            target_mpp = config.mpp if config.mpp is not None else DEFAULT_MPP
        plan = slide.plan_for_mpp(target_mpp)
        patch_size_level0 = config.patch_size * plan.target_downsample
        step = config.step or config.patch_size
        overview = None  # the segmentation image, reused for the preview
        if mask_path is not None:
            from slidemil.tissue.user_masks import load_user_mask  # mask readers: only here

            tissue = load_user_mask(mask_path, slide.dimensions, config.seg_size)
            segmentation: dict[str, Any] = {"mask_path": mask_path}
        else:
            seg_downsample = segmentation_downsample(slide, config, patch_size_level0)
            tissue, overview = _segment(slide, config, seg_downsample)
            segmentation = {**config.tissue_params.as_dict(), "downsample": tissue.downsample}
        coords = select_patches(
            tissue.mask, tissue.downsample, slide.dimensions, patch_size_level0,
            step * plan.target_downsample, config.min_tissue,
        )  # fmt: skip
        if config.previews:
            thumbnail, thumb_downsample = _preview_base(slide, overview)
            image = draw_preview(thumbnail, thumb_downsample, tissue, coords, patch_size_level0)
            write_preview(out_dir / "previews" / f"{slide_id}{PREVIEW_SUFFIX}", image)
        if len(coords) == 0:
            where = "no tissue found" if not tissue.mask.any() else "no patch reached"
            raise NoTissueError(
                slide_path,
                f"{where} (min_tissue {config.min_tissue}, tissue covers "
                f"{tissue.tissue_fraction:.1%} of the slide)",
                "check the preview; lower --min-tissue or --sthresh, or give a mask_path",
            )
        patches = PatchSet(
            coords=coords,
            patch_size=config.patch_size,
            read_level=plan.level,
            read_size=math.ceil(config.patch_size * plan.scale - 1e-9),
            target_downsample=plan.target_downsample,
            slide_id=slide_id,
            slide_path=str(slide_path),
            step=step,
            target_mpp=target_mpp if config.magnification is None else None,
            magnification=config.magnification,
            slide_mpp=level0_mpp,
            slide_dimensions=tuple(slide.dimensions),
            min_tissue=config.min_tissue,
            segmentation=segmentation,
            extra={"reader": slide.reader_name},  # provenance: which reader gave the pixels
        )
        write_patch_file(_patch_path(out_dir, slide_id), patches)
    return len(coords)


def segmentation_downsample(slide: Slide, config: PatchConfig, patch_size_level0: float) -> float:
    """Level-0 px per px of the image tissue is segmented on: ``seg_mpp``, finer where a patch
    side would span fewer than ``MIN_MASK_PX_PER_PATCH`` px, coarser where the slide's longer
    side would pass ``seg_size`` px; never finer than level 0.

    A resolution in µm/px makes the median blur and closing kernels (px of this image) the
    same size in tissue on every slide, as the µm² area limits already are.
    """
    downsample = min(config.seg_mpp / slide.mpp, patch_size_level0 / MIN_MASK_PX_PER_PATCH)
    return max(downsample, max(slide.dimensions) / config.seg_size, 1.0)


def _segment(slide: Slide, config: PatchConfig, downsample: float) -> tuple[TissueMask, Any]:
    """Segment at the level nearest ``downsample`` (the coarser on a tie; shrunk when that is
    over ``MAX_SEGMENTATION_OVERSIZE`` times too fine, as a flat slide's level 0 is); returns
    the tissue and the whole-slide image it was found on."""
    target_size = max(1, round(max(slide.dimensions) / downsample))
    level = nearest_level(slide.level_dimensions, target_size)
    if max(slide.level_dimensions[level]) > MAX_SEGMENTATION_OVERSIZE * target_size:
        image, downsample = slide.thumbnail(target_size)
    else:
        image = slide.read_level(level)
        downsample = slide.dimensions[0] / image.shape[1]
    tissue = segment_tissue(image, downsample, slide.mpp, config.tissue_params)
    return tissue, image


def _preview_base(slide: Slide, overview: Any | None) -> tuple[Any, float]:
    """The preview's thumbnail, ``PREVIEW_SIZE`` px on its longer side: the segmentation image
    resized when it has at least half that (no second read of the slide; the preview then
    shows what the segmentation saw), else read from the slide."""
    if overview is not None and max(overview.shape[:2]) * 2 >= PREVIEW_SIZE:
        factor = max(overview.shape[:2]) / PREVIEW_SIZE
        size = (
            max(1, round(overview.shape[1] / factor)),
            max(1, round(overview.shape[0] / factor)),
        )
        interpolation = cv2.INTER_AREA if factor >= 1 else cv2.INTER_LINEAR
        image = cv2.resize(overview, size, interpolation=interpolation)
        return image, slide.dimensions[0] / size[0]
    return slide.thumbnail(PREVIEW_SIZE)
