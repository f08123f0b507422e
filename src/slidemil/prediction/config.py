"""``PredictConfig``: every option of ``slidemil predict`` (the ``predict`` section of a config)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slidemil.config import Device, ShardSpec, StageConfig
from slidemil.readers.protocol import READER_HELP, ReaderName

MODEL_CHOICE = re.compile(r"^(mean|fold_\d+)$")


class PredictConfig(StageConfig):
    """Options of ``slidemil predict``. Patching and extraction options are not here: they are
    the ones the training run recorded, so new slides are cut and encoded exactly as the
    training slides were."""

    model: str = Field(
        "mean",
        description="'mean': average the class probabilities of every fold's model; 'fold_<k>': "
        "that fold's model only",
    )
    features: Path | None = Field(
        None,
        description="folder of existing feature files <slide_id>.h5 or .pt (slidemil, CLAM's "
        "h5_files / pt_files or its --feat_dir, TRIDENT's features_<encoder>) made with the "
        "run's encoder; skips patching and extraction",
    )
    patches: Path | None = Field(
        None,
        description="with --features: folder of the slides' patch files (CLAM <slide>.h5, "
        "TRIDENT <slide>_patches.h5, or a folder holding patches/), to place the patches of "
        "feature files that do not record their geometry (CLAM's), for heat maps",
    )
    patch_size_level0: float | None = Field(
        None,
        gt=0,
        description="with --features: patch footprint in level-0 px for feature files that "
        "have coordinates but no geometry (CLAM h5_files), for heat maps",
    )
    step: int | None = Field(
        None,
        ge=1,
        description="patch step in px at the patch resolution, for denser attention maps "
        "(smaller than the patch size: overlapping patches); raw slides only (default: the "
        "run's)",
    )
    device: Device = Field("auto", description="auto, cpu, cuda or cuda:N (extraction and models)")
    batch_size: int | None = Field(
        None, ge=1, description="patches per encoder forward pass (default: extraction's)"
    )
    workers: int | None = Field(
        None,
        ge=0,
        description="processes patching slides and DataLoader workers reading patches "
        "(default: each stage's)",
    )
    shard: ShardSpec = Field(None, description="i/n: only every n-th slide from the i-th (SLURM)")
    calibrate: Literal["none", "temperature"] = Field(
        "none",
        description="'temperature': divide each fold's logits by the temperature fitted by "
        "`slidemil evaluate RUN --calibrate temperature` (fold_<k>/calibration.json)",
    )
    explain: Literal["attention", "ig"] = Field(
        "attention",
        description="how per-class patch scores are made: 'attention', the model's own scores "
        "(per class where the model has them, e.g. clam-mb, dsmil); 'ig', integrated gradients "
        "of each class logit, for any model (slower: ig_steps forward and C backward passes)",
    )
    ig_baseline: Literal["zero", "mean"] = Field(
        "zero",
        description="with --explain ig: the reference input, 'zero' (the training split's mean "
        "feature, for standardised folds) or 'mean' (the slide's own mean feature)",
    )
    ig_steps: int = Field(
        32,
        ge=1,
        le=1024,
        description="with --explain ig: Gauss-Legendre steps of the path integral",
    )
    strict: bool = Field(
        False,
        description="refuse the cohort when any row is bad (slide, mask or feature file missing, "
        "empty or unreadable) instead of recording it in failures.csv and going on",
    )
    quiet: bool = Field(False, description="no progress bars")
    reader: ReaderName = Field("auto", description=READER_HELP + " (patching and extraction)")

    @model_validator(mode="after")
    def _geometry_needs_features(self) -> PredictConfig:
        given = [name for name in ("patches", "patch_size_level0") if getattr(self, name)]
        if given and self.features is None:
            raise ValueError(
                f"{' and '.join(given)} place the patches of existing --features; raw slides "
                "are patched with the run's own geometry"
            )
        return self

    @field_validator("model")
    @classmethod
    def _valid_model(cls, value: str) -> str:
        if not MODEL_CHOICE.match(value):
            raise ValueError(f"model {value!r} must be 'mean' or 'fold_<k>', e.g. fold_0")
        return value
