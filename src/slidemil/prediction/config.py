"""``PredictConfig``: every option of ``slidemil predict`` (the ``predict`` section of a config)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator

from slidemil.config import Device, ShardSpec, StageConfig

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
        description="folder of existing feature files <slide_id>.h5 (slidemil, CLAM or TRIDENT) "
        "made with the run's encoder; skips patching and extraction",
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
    quiet: bool = Field(False, description="no progress bars")

    @field_validator("model")
    @classmethod
    def _valid_model(cls, value: str) -> str:
        if not MODEL_CHOICE.match(value):
            raise ValueError(f"model {value!r} must be 'mean' or 'fold_<k>', e.g. fold_0")
        return value
