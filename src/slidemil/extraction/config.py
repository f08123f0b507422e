"""``ExtractConfig``: every option of ``slidemil extract`` (the ``extract`` section of a config).
Kept apart from the pipeline so ``--help`` imports neither h5py nor torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slidemil.augmentation.spec import (
    DEFAULT_OPS,
    OP_NAMES,
    AugmentSpec,
    augment_spec,
    parse_ops,
    parse_strengths,
)
from slidemil.config import Device, ShardSpec, StageConfig, default_reader_workers
from slidemil.readers.protocol import READER_HELP, ReaderName


class ExtractConfig(StageConfig):
    encoder: str = Field("resnet50-trunc", description="encoder name (see `slidemil encoders`)")
    weights: str | None = Field(
        None,
        description="weights: empty for the encoder's pretrained weights, 'random' for seeded "
        "random weights, or a checkpoint file (.pth/.pt/.bin/.safetensors)",
    )
    revision: str | None = Field(
        None,
        description="Hugging Face weights: branch, tag or commit to load [default: main]; the "
        "commit it resolves to is recorded with the features",
    )
    device: Device = Field(
        "auto", description="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)"
    )
    batch_size: int = Field(256, ge=1, description="patches per forward pass")
    workers: int = Field(
        default_factory=default_reader_workers,
        ge=0,
        description="DataLoader worker processes reading patches [default: the CPUs this process "
        "may use, less one, at most 8; under torchrun the ranks of a node share them]",
    )
    prefetch: int = Field(4, ge=1, description="batches each worker reads ahead")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored feature dtype")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="autocast dtype on CUDA (auto: the encoder's preference); CPU runs float32",
    )
    features_name: str | None = Field(
        None, description="output folder under features/ [default: the encoder name]"
    )
    shard: ShardSpec = Field(None, description="i/n: process every n-th slide from i (SLURM)")
    strict: bool = Field(
        False,
        description="refuse the run when any slide's patch file or slide file is missing or "
        "unreadable, instead of recording it in failures.csv and going on",
    )
    quiet: bool = Field(False, description="no progress bar")
    reader: ReaderName = Field("auto", description=READER_HELP)
    decode: Literal["auto", "workers", "device"] = Field(
        "auto",
        description="where JPEG tiles read by the tile reader are decoded: auto (on the GPU when "
        "extracting on CUDA, else in the reader workers), workers, or device (batched "
        "torchvision decode on the extraction device)",
    )
    views: int = Field(
        0,
        ge=0,
        le=64,
        description="augmented views per patch stored next to the plain features (0: none); "
        "each view costs about one more encoder pass",
    )
    augment: tuple[str, ...] = Field(
        DEFAULT_OPS,
        description=f"augmentations that make the views, comma-separated, applied in the order "
        f"{', '.join(OP_NAMES)}",
    )
    augment_strength: dict[str, float] | None = Field(
        None,
        description="OP=VALUE strengths, comma-separated (defaults: hed=0.05, colour=0.1, "
        "hue=0.02, blur=1.0, the largest sigma in px)",
    )
    augment_seed: int = Field(
        0, ge=0, description="seed of the views: a view depends only on it, the slide, the "
        "patch's coordinates and the view number",
    )  # fmt: skip
    stain_norm: Literal["macenko", "reinhard"] | None = Field(
        None,
        description="stain normalisation fitted on --stain-target, applied to every patch "
        "before augmentation and the encoder: macenko or reinhard (default: none)",
    )
    stain_target: str | None = Field(
        None, description="RGB image (PNG, JPEG, TIFF) of well-stained tissue to normalise to"
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _ops(cls, value: Any) -> tuple[str, ...]:
        return parse_ops(value)

    @field_validator("augment_strength", mode="before")
    @classmethod
    def _strengths(cls, value: Any) -> dict[str, float] | None:
        return None if value is None else parse_strengths(value)

    @model_validator(mode="after")
    def _consistent(self) -> ExtractConfig:
        self.augment_spec()  # raises for views without ops or strengths of unchosen ops
        if (self.stain_norm is None) != (self.stain_target is None):
            raise ValueError("--stain-norm and --stain-target go together")
        return self

    def augment_spec(self) -> AugmentSpec | None:
        """The resolved augmentation of the views (``None`` without views)."""
        return augment_spec(self.views, self.augment, self.augment_strength, self.augment_seed)
