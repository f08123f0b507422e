"""``ExtractConfig``: every option of ``slidemil extract`` (the ``extract`` section of a config).
Kept apart from the pipeline so ``--help`` imports neither h5py nor torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
