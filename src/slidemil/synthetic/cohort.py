"""A synthetic cohort: real SVS slides, ground truth and ``cohort.csv``.

Layout under the output folder::

    slides/<slide_id>.svs     pyramidal JPEG Aperio SVS
    truth/<slide_id>.json     the scene (tissue, holes, lesions in level-0 px), exact at any scale
    truth/<slide_id>.png      label map at ``truth_downsample``: 0 glass, 128 tissue, 255 lesion
    sites.json                with ``sites``: each site's staining and scanner parameters
    cohort.csv                slide_id, path, label, patient_id, slide_mpp (+ site with ``sites``)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from slidemil import atomic
from slidemil.cohort import Cohort, load_cohort
from slidemil.config import StageConfig, build, read_yaml, write_resolved
from slidemil.errors import ConfigError
from slidemil.formats.pyramid_tiff import write_pyramid
from slidemil.runner import Task, run_per_slide
from slidemil.synthetic.scene import LABEL_LESION, LABEL_TISSUE, SlideScene, make_scene
from slidemil.synthetic.sites import SiteStain, make_site_stains
from slidemil.synthetic.textures import lesion_style

REFERENCE_MPP = 0.5  # --size is measured in px at this resolution
TRUTH_MAX_SIZE = 1024
CONFIG_NAME = "synth_config.yaml"


class SynthConfig(StageConfig):
    slides: int = Field(48, ge=1, description="number of slides")
    classes: int = Field(8, ge=2, le=64, description="number of classes (lesion kinds)")
    size: int = Field(
        4096,
        ge=256,
        le=400_000,
        description="longer side of each slide in px at 0.5 µm/px (0.25 µm/px slides get 2x)",
    )
    mpp: list[float] = Field(
        [0.5], min_length=1, description="level-0 µm/px, one per slide drawn from this list"
    )
    imbalance: float = Field(
        1.0, ge=1.0, description="ratio of the most to the least frequent class"
    )
    max_slides_per_patient: int = Field(3, ge=1, description="slides per patient: 1 to this")
    sites: int = Field(
        0,
        ge=0,
        le=64,
        description="hospital sites (0: none); patients are nested in sites, every site has "
        "every class, and each site stains and scans in its own way (a site column in cohort.csv)",
    )
    lesion_fraction: tuple[float, float] = Field(
        (0.05, 0.12), description="range of tissue area covered by lesions"
    )
    seed: int = Field(0, description="random seed; the same seed gives the same cohort")
    quality: int = Field(85, ge=10, le=100, description="JPEG quality of the tiles")
    workers: int = Field(1, ge=1, description="slides written in parallel")
    quiet: bool = Field(False, description="no progress bar")

    @field_validator("mpp")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(v <= 0 for v in values):
            raise ValueError("µm/px values must be positive")
        return values

    @field_validator("lesion_fraction")
    @classmethod
    def _fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high < 1:
            raise ValueError("lesion_fraction must be (low, high) with 0 < low <= high < 1")
        return value

    @model_validator(mode="after")
    def _enough_slides(self) -> SynthConfig:
        if self.slides < self.classes:
            raise ValueError(f"{self.slides} slides cannot cover {self.classes} classes")
        if self.slides < self.classes * self.sites:
            raise ValueError(
                f"{self.slides} slides cannot give each of {self.sites} sites all "
                f"{self.classes} classes (at least {self.classes * self.sites} needed)"
            )
        return self


@dataclass(frozen=True)
class SlidePlan:
    slide_id: str
    patient_id: str
    class_index: int
    mpp: float
    width: int
    height: int
    seed: int
    lesion_fraction: tuple[float, float] = (0.05, 0.12)
    site_stain: SiteStain | None = None

    @property
    def site(self) -> str | None:
        return None if self.site_stain is None else self.site_stain.name


def class_names(n_classes: int) -> list[str]:
    return [lesion_style(k).name for k in range(n_classes)]


def plan_cohort(config: SynthConfig) -> list[SlidePlan]:
    """Which slide has which class, patient, site, resolution and size (deterministic in the
    seed). With ``sites``, each class's slides are split evenly over the sites first, so every
    site has every class in about the same proportions, and each patient belongs to one site."""
    rng = np.random.default_rng(config.seed)
    counts = _class_counts(config.slides, config.classes, config.imbalance)
    site_stains = make_site_stains(config.sites, config.seed) if config.sites else [None]
    plans: list[SlidePlan] = []
    patient = 0
    for class_index, count in enumerate(counts):
        for site_stain, site_count in zip(
            site_stains, _split(count, len(site_stains)), strict=True
        ):
            remaining = site_count
            while remaining > 0:
                n = min(remaining, int(rng.integers(1, config.max_slides_per_patient + 1)))
                for _ in range(n):
                    mpp = float(rng.choice(config.mpp))
                    width = round(config.size * REFERENCE_MPP / mpp)
                    height = round(width * rng.uniform(0.65, 0.85))
                    plans.append(
                        SlidePlan(
                            slide_id="",
                            patient_id=f"patient_{patient:03d}",
                            class_index=class_index,
                            mpp=mpp,
                            width=width,
                            height=height,
                            seed=int(rng.integers(2**31)),
                            lesion_fraction=tuple(config.lesion_fraction),
                            site_stain=site_stain,
                        )
                    )
                remaining -= n
                patient += 1
    order = rng.permutation(len(plans))  # interleave classes in the CSV, as real cohorts are
    return [
        SlidePlan(**{**plans[i].__dict__, "slide_id": f"slide_{rank:04d}"})
        for rank, i in enumerate(order)
    ]


def _split(count: int, parts: int) -> list[int]:
    """``count`` split into ``parts`` near-equal whole numbers, the larger ones first."""
    return [count // parts + (1 if k < count % parts else 0) for k in range(parts)]


def _class_counts(n_slides: int, n_classes: int, imbalance: float) -> list[int]:
    """Slide counts per class, geometric from most to least frequent, each class at least 1."""
    weights = np.array([imbalance ** (-k / max(1, n_classes - 1)) for k in range(n_classes)])
    raw = weights / weights.sum() * (n_slides - n_classes)
    counts = np.floor(raw).astype(int) + 1
    for k in np.argsort(-(raw - np.floor(raw)))[: n_slides - counts.sum()]:
        counts[k] += 1
    return counts.tolist()


def synth(out: str | Path, config: SynthConfig | None = None, **options) -> Cohort:
    """Write a synthetic cohort under ``out`` and return it (already-written slides are kept).

    Options are :class:`SynthConfig` fields, e.g. ``synth("demo", slides=16, classes=4)``.
    """
    config = config or build(SynthConfig, section="synth", overrides=options)
    out = Path(out)
    _check_same_cohort(out, config)
    names = class_names(config.classes)
    plans = plan_cohort(config)
    tasks = [
        Task(p.slide_id, str(out / "slides" / f"{p.slide_id}.svs"), (p, str(out), config.quality))
        for p in plans
    ]

    def is_done(task: Task) -> bool:
        return Path(task.path).is_file() and (out / "truth" / f"{task.slide_id}.json").is_file()

    run_per_slide(
        "synth",
        tasks,
        write_slide,
        out_dir=out,
        is_done=is_done,
        workers=config.workers,
        quiet=config.quiet,
    )
    frame = pd.DataFrame(
        {
            "slide_id": [p.slide_id for p in plans],
            "path": [f"slides/{p.slide_id}.svs" for p in plans],
            "label": [names[p.class_index] for p in plans],
            "patient_id": [p.patient_id for p in plans],
            "slide_mpp": [p.mpp for p in plans],
        }
    )
    if config.sites:
        frame["site"] = [p.site for p in plans]
        stains = [s.to_dict() for s in make_site_stains(config.sites, config.seed)]
        atomic.write_text(out / "sites.json", json.dumps(stains, indent=2) + "\n")
    atomic.write_csv(out / "cohort.csv", frame)
    return load_cohort(out / "cohort.csv", check_files=False)


def _check_same_cohort(out: Path, config: SynthConfig) -> None:
    """Refuse to mix slides of two different cohorts in one folder; record the options."""
    record = out / CONFIG_NAME
    # Options that change slide content; workers and quiet do not.
    content = config.model_dump(mode="json", exclude={"workers", "quiet"})
    if record.is_file():
        previous = read_yaml(record).get("synth") or {}
        previous = {k: v for k, v in previous.items() if k not in ("workers", "quiet")}
        # an option added since that cohort was written had its default there
        defaults = {k: f.default for k, f in SynthConfig.model_fields.items()}
        previous = {**{k: defaults[k] for k in content if k not in previous}, **previous}
        if previous != content:
            changed = sorted(k for k in content if previous.get(k) != content[k])
            raise ConfigError(
                out,
                f"holds a synthetic cohort made with other options ({', '.join(changed)})",
                "choose a new --out folder or delete this one",
            )
    write_resolved(record, {"synth": config})


def write_slide(slide_id: str, plan: SlidePlan, out: str, quality: int) -> str:
    """Render one slide and its ground truth (runs in a worker process)."""
    out_dir = Path(out)
    rng = np.random.default_rng(plan.seed)
    scene = make_scene(
        rng, plan.width, plan.height, plan.mpp, plan.class_index,
        lesion_fraction=plan.lesion_fraction,
    )  # fmt: skip
    scene.site_stain = plan.site_stain
    magnification = round(10.0 / plan.mpp)
    path = write_pyramid(
        out_dir / "slides" / f"{slide_id}.svs",
        plan.width,
        plan.height,
        scene.render,
        mpp=plan.mpp,
        magnification=magnification,
        quality=quality,
        slide_name=slide_id,
    )
    write_truth(out_dir / "truth", slide_id, scene)
    return str(path)


def truth_downsample(scene: SlideScene) -> float:
    return max(1.0, max(scene.width, scene.height) / TRUTH_MAX_SIZE)


def write_truth(folder: Path, slide_id: str, scene: SlideScene) -> None:
    labels = scene.label_map(truth_downsample(scene))
    visible = np.zeros_like(labels)
    visible[labels == LABEL_TISSUE] = 128
    visible[labels == LABEL_LESION] = 255
    with atomic.atomic_path(folder / f"{slide_id}.png") as tmp:
        if not cv2.imwrite(str(tmp), visible):
            raise OSError(f"{tmp}: cannot write PNG")
    # The JSON is written last: its presence marks the slide as complete.
    atomic.write_text(folder / f"{slide_id}.json", scene.to_json())


def load_truth(out: str | Path, slide_id: str) -> SlideScene:
    """The ground-truth scene of a synthetic slide."""
    return SlideScene.load(Path(out) / "truth" / f"{slide_id}.json")


__all__ = ["SynthConfig", "class_names", "load_truth", "plan_cohort", "synth", "write_slide"]
