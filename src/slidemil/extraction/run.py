"""``extract``: patch files + slides -> ``features/<encoder>/<slide_id>.h5``.

One DataLoader streams the batches of every slide still to do (workers read and decode, the main
process only runs the encoder), and :func:`~slidemil.runner.run_per_slide` takes the slides in the
same order, so skip-if-done, failure records and the summary are the runner's. A slide's
features stay on the device until its last batch, then are written atomically in one file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from slidemil.cohort import load_cohort
from slidemil.config import StageConfig, build, read_yaml, write_resolved
from slidemil.encoders import Encoder, get_encoder, get_encoder_spec
from slidemil.errors import ArtifactError, ConfigError, SlidemilError
from slidemil.extraction.dataset import PatchBatches, SlidePatches, make_loader
from slidemil.extraction.distributed import RankInfo, rank_shard, resolve_device
from slidemil.formats.feature_file import is_complete_feature_file, write_feature_file
from slidemil.formats.patch_file import read_patch_file
from slidemil.runner import RunSummary, Shard, Task, run_per_slide

log = logging.getLogger(__name__)

CONFIG_NAME = "extract_config.yaml"
# Options that change the features; a folder may only hold features made with one set of them.
IDENTITY_KEYS = ("encoder", "weights_identity", "dtype", "transform")
PATCH_ATTRS_COPIED = (
    "patch_size", "patch_size_level0", "read_level", "read_size", "target_mpp", "magnification",
    "slide_mpp", "target_downsample", "step", "slide_dimensions",
)  # fmt: skip


class ExtractConfig(StageConfig):
    encoder: str = Field("resnet50-trunc", description="encoder name (see `slidemil encoders`)")
    weights: str | None = Field(
        None,
        description="weights: empty for the encoder's pretrained weights, 'random' for seeded "
        "random weights, or a checkpoint file (.pth/.pt/.bin/.safetensors)",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    batch_size: int = Field(256, ge=1, description="patches per forward pass")
    workers: int = Field(4, ge=0, description="DataLoader worker processes reading patches")
    prefetch: int = Field(4, ge=1, description="batches each worker reads ahead")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored feature dtype")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="autocast dtype on CUDA (auto: the encoder's preference); CPU runs float32",
    )
    features_name: str | None = Field(
        None, description="output folder under features/ [default: the encoder name]"
    )
    shard: str | None = Field(None, description="i/n: process every n-th slide from i (SLURM)")
    quiet: bool = Field(False, description="no progress bar")

    @field_validator("shard")
    @classmethod
    def _valid_shard(cls, value: str | None) -> str | None:
        Shard.parse(value)
        return value

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str) -> str:
        head, _, index = value.partition(":")
        if head not in ("auto", "cpu", "cuda") or (index and not index.isdigit()):
            raise ValueError(f"device {value!r} must be auto, cpu, cuda or cuda:N")
        return value


def extract(work: str | Path, config: ExtractConfig | None = None, **options: Any) -> RunSummary:
    """Encode every patch of every slide in ``work`` (a folder made by ``slidemil patch``).

    Reads ``work/cohort.csv`` and ``work/patches/<slide_id>.h5``; writes
    ``work/features/<name>/<slide_id>.h5``, ``failures.csv`` and ``extract_config.yaml`` there.
    Options are :class:`ExtractConfig` fields, e.g. ``extract("work", encoder="resnet18",
    weights="random", device="cpu")``. Finished slides are skipped; under ``torchrun`` each rank
    takes its own shard of slides and GPU. A slide with no patches gets an empty (0, D) bag.
    """
    config = config or build(ExtractConfig, section="extract", overrides=options)
    work = Path(work)
    cohort = load_cohort(work / "cohort.csv", require_labels=False)
    ranks = RankInfo.from_env()
    shard = rank_shard(Shard.parse(config.shard), ranks)
    device = resolve_device(config.device, ranks)
    spec = get_encoder_spec(config.encoder)
    out_dir = work / "features" / (config.features_name or spec.name)

    tasks = [
        Task(r.slide_id, str(r.path), (str(work / "patches" / f"{r.slide_id}.h5"), r.slide_mpp))
        for r in shard.select(list(cohort))
    ]

    def is_done(task: Task) -> bool:
        return is_complete_feature_file(out_dir / f"{task.slide_id}.h5", spec.name)

    todo = [t for t in tasks if not is_done(t)]
    encoder = get_encoder(config.encoder, config.weights, progress=not config.quiet)
    identity = _identity(encoder, config)
    _check_same_features(out_dir, identity)
    write_resolved(
        out_dir / CONFIG_NAME, {"extract": config, "identity": {**identity, "device": device}}
    )
    stream = FeatureStream(encoder, todo, config, device, out_dir, identity)
    try:
        summary = run_per_slide(
            "extract", tasks, stream.finish_slide, out_dir=out_dir, is_done=is_done,
            workers=1, quiet=True,
        )  # fmt: skip
    finally:
        stream.close()
    if not config.quiet:
        tqdm.write(f"{summary.line()} ({stream.patches_per_second:.1f} patches/s) -> {out_dir}")
    return summary


def _identity(encoder: Encoder, config: ExtractConfig) -> dict[str, Any]:
    return {
        "encoder": encoder.name,
        "weights_identity": encoder.weights_identity,
        "dtype": config.dtype,
        "transform": encoder.spec.transform.to_json(),
    }


def _check_same_features(out_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to mix features of other weights / transform / dtype in one folder."""
    record = out_dir / CONFIG_NAME
    if not record.is_file():
        return
    previous = read_yaml(record).get("identity") or {}
    changed = [k for k in IDENTITY_KEYS if k in previous and previous[k] != identity[k]]
    if changed:
        raise ConfigError(
            out_dir,
            f"holds features made with another {', '.join(changed)} "
            f"({', '.join(f'{k}={previous[k]}' for k in changed)})",
            "choose another --features-name or delete the folder",
        )


class FeatureStream:
    """Runs the encoder over the DataLoader and hands each slide's features out in order."""

    def __init__(
        self,
        encoder: Encoder,
        todo: list[Task],
        config: ExtractConfig,
        device: str,
        out_dir: Path,
        identity: dict[str, Any],
    ):
        import torch

        self.encoder, self.config, self.out_dir, self.identity = encoder, config, out_dir, identity
        self.device = torch.device(device)
        self.model = encoder.model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast = _autocast_dtype(config.precision, encoder, self.device)
        self.slides = [_load_slide(t) for t in todo]
        self.order = {s.slide_id: i for i, s in enumerate(self.slides)}
        total = sum(len(s) for s in self.slides if s.error is None)
        self.bar = tqdm(
            total=total, desc=f"extract {encoder.name}", unit="patch", dynamic_ncols=True,
            disable=config.quiet or total == 0,
        )  # fmt: skip
        self.patches_done = 0
        self.seconds = 0.0
        self._start = time.perf_counter()
        self._batches: Iterator[dict[str, Any]] | None = None
        self._next: dict[str, Any] | None = None

    @property
    def patches_per_second(self) -> float:
        return self.patches_done / self.seconds if self.seconds > 0 else 0.0

    def _iterator(self) -> Iterator[dict[str, Any]]:
        if self._batches is None:
            dataset = PatchBatches(self.slides, self.config.batch_size)
            loader = make_loader(
                dataset, workers=self.config.workers, prefetch=self.config.prefetch,
                pin_memory=self.device.type == "cuda",
            )  # fmt: skip
            self._batches = iter(loader)
        return self._batches

    def finish_slide(self, slide_id: str, patch_path: str, slide_mpp: float | None) -> int:
        """Encode the batches of ``slide_id`` (the runner's current slide) and write its file."""
        index = self.order.get(slide_id)
        if index is None:  # the runner and the stream disagree only if files changed mid-run
            raise ArtifactError(patch_path, "slide was not planned for extraction; rerun")
        slide = self.slides[index]
        chunks, error = self._encode_until(index)
        if slide.error is not None:
            raise slide.error
        if error:
            raise ArtifactError(slide.slide_path, error)
        features = self._gather(chunks, len(slide))
        write_feature_file(
            self.out_dir / f"{slide_id}.h5", features, slide.patches.coords,
            _attrs(slide, self.identity),
        )  # fmt: skip
        self.seconds = time.perf_counter() - self._start
        return len(slide)

    def _encode_until(self, index: int) -> tuple[list[Any], str]:
        """Consume batches up to and including slide ``index``'s last one."""
        import torch

        chunks: list[Any] = []
        error = ""
        batches = self._iterator()
        while True:
            batch = next(batches)
            if batch["slide_index"] < index:
                continue  # a slide the runner skipped since planning (finished by another shard)
            if batch["error"]:
                error = error or batch["error"]
            elif batch["images"].shape[0] > 0 and not error:
                images = batch["images"].to(self.device, non_blocking=True)
                with torch.inference_mode(), self._autocast_context():
                    x = self.encoder.preprocess(images)
                    if self.device.type == "cuda":
                        x = x.contiguous(memory_format=torch.channels_last)
                    chunks.append(self.model(x).float())
                self.patches_done += images.shape[0]
                self.bar.update(images.shape[0])
            if batch["last"]:
                return chunks, error

    def _autocast_context(self) -> Any:
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _gather(self, chunks: list[Any], rows: int) -> Any:
        import numpy as np
        import torch

        dim = self.encoder.output_dim
        if not chunks:
            return np.zeros((0, dim), dtype=self.config.dtype)
        # One device->host copy per slide: no per-batch sync stalls the GPU.
        features = torch.cat(chunks).cpu().numpy().astype(self.config.dtype)
        if features.shape != (rows, dim):
            raise ArtifactError(
                None,
                f"encoder {self.encoder.name!r} gave {features.shape}, expected ({rows}, {dim})",
            )
        return features

    def close(self) -> None:
        self.bar.close()
        self._batches = None  # shuts the DataLoader workers down


def _load_slide(task: Task) -> SlidePatches:
    patch_path, slide_mpp = task.args
    try:
        patches = read_patch_file(patch_path)
    except SlidemilError as e:
        return SlidePatches(task.slide_id, task.path, None, slide_mpp, error=e)
    return SlidePatches(task.slide_id, task.path, patches, slide_mpp)


def _attrs(slide: SlidePatches, identity: dict[str, Any]) -> dict[str, Any]:
    patches = slide.patches
    copied = {k: getattr(patches, k) for k in PATCH_ATTRS_COPIED if hasattr(patches, k)}
    copied["slide_dimensions"] = list(patches.slide_dimensions or ())
    return {
        "slide_id": slide.slide_id,
        "slide_path": slide.slide_path,
        "encoder": identity["encoder"],
        "weights": identity["weights_identity"],
        "transform": identity["transform"],
        **copied,
    }


def _autocast_dtype(precision: str, encoder: Encoder, device: Any) -> Any:
    """bf16/fp16 autocast on CUDA (the encoder's preference under ``auto``); off on CPU."""
    import torch

    if device.type != "cuda" or precision == "float32":
        return None
    name = encoder.spec.autocast_dtype if precision == "auto" else precision
    if name is None:
        return None
    if name == "bfloat16" and not torch.cuda.is_bf16_supported():
        name = "float16"
    return getattr(torch, name)


__all__ = ["CONFIG_NAME", "ExtractConfig", "extract"]
