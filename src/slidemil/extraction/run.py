"""``extract``: patch files + slides -> ``features/<encoder>/<slide_id>.h5``.

One DataLoader streams the batches of every slide still to do (workers read and decode, the main
process only runs the encoder), and :func:`~slidemil.runner.run_per_slide` takes the slides in the
same order, so skip-if-done, failure records and the summary are the runner's.

Features never pile up on the device: each batch's output is cast to the stored dtype and copied
into pinned host memory asynchronously (a CUDA event marks when it has landed), and landed chunks
are streamed into the slide's temp HDF5 file, which is renamed when the slide is complete. The
main loop therefore never waits for the GPU except when more than :data:`MAX_COPIES_IN_FLIGHT`
copies are outstanding, and a 200k-patch slide with a 1536-d encoder needs neither 1 GB of GPU
memory nor a second host copy.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from slidemil import atomic
from slidemil.cohort import load_cohort
from slidemil.config import build, read_yaml, write_resolved
from slidemil.devices import resolve_device
from slidemil.encoders import Encoder, get_encoder, get_encoder_spec
from slidemil.errors import (
    ArtifactError,
    ConfigError,
    SlidemilError,
    SlideReadError,
    WorkerCrashError,
)
from slidemil.extraction.config import ExtractConfig
from slidemil.extraction.dataset import (
    PatchBatches,
    SlidePatches,
    batch_size_of,
    device_images,
    make_loader,
)
from slidemil.extraction.distributed import RankInfo, rank_shard
from slidemil.formats.feature_file import (
    FEATURE_IDENTITY_KEYS,
    IDENTITY_DEFAULTS,
    FeatureWriter,
    is_complete_feature_file,
)
from slidemil.formats.patch_file import read_patch_file
from slidemil.inputs import artifact_file_problem, slide_file_problem
from slidemil.runner import (
    RunSummary,
    Shard,
    Task,
    earlier_failure,
    plan_slides,
    read_failures,
)

if TYPE_CHECKING:
    from slidemil.stain import StainNormalizer

log = logging.getLogger(__name__)

CONFIG_NAME = "extract_config.yaml"
# Device->host copies enqueued but not yet written; past this the loop waits for the oldest.
MAX_COPIES_IN_FLIGHT = 8


def extract(
    work: str | Path,
    config: ExtractConfig | None = None,
    *,
    stain_normalizer: StainNormalizer | None = None,
    **options: Any,
) -> RunSummary:
    """Encode every patch of every slide in ``work`` (a folder made by ``slidemil patch``).

    Reads ``work/cohort.csv`` and ``work/patches/<slide_id>.h5``; writes
    ``work/features/<name>/<slide_id>.h5``, ``failures.csv`` and ``extract_config.yaml`` there.
    Options are :class:`ExtractConfig` fields, e.g. ``extract("work", encoder="resnet18",
    weights="random", device="cpu")``. Finished slides are skipped (a slide re-patched since,
    or whose file holds other views than asked, is encoded again); under ``torchrun`` each rank
    takes its own shard of slides and GPU. A slide with no patches gets an empty (0, D) bag; a
    slide whose patch file or slide file cannot be read is recorded in ``failures.csv`` and the
    others go on (``strict=True``: such bad rows, found before any work, refuse the run).
    Processes sharing the folder lock each slide.

    ``views=K`` also stores K augmented views of every patch (``/views``, see
    :mod:`slidemil.augmentation`); ``stain_norm`` + ``stain_target`` normalise every patch before
    augmentation and the encoder. ``stain_normalizer``: an already fitted normaliser to apply
    instead (prediction passes the one a run was trained with); not with ``stain_norm``.
    """
    config = config or build(ExtractConfig, section="extract", overrides=options)
    if stain_normalizer is not None and config.stain_norm is not None:
        raise ConfigError(
            None, "both a fitted stain normaliser and --stain-norm given", "give one of them"
        )
    normalizer = stain_normalizer or _fit_stain_normalizer(config)
    augmentation = config.augment_spec()
    expected = {
        "n_views": config.views,
        "augmentation": None if augmentation is None else augmentation.to_record(),
        "stain_normalization": None if normalizer is None else normalizer.to_state(),
    }
    work = Path(work)
    # A slide gone since patching fails alone (failures.csv), not the whole cohort.
    cohort = load_cohort(work / "cohort.csv", require_labels=False, check_files=False)
    ranks = RankInfo.from_env()
    shard = rank_shard(Shard.parse(config.shard), ranks)
    device = str(resolve_device(config.device, ranks.local_rank, ranks.world_size))
    spec = get_encoder_spec(config.encoder)
    out_dir = work / "features" / (config.features_name or spec.name)

    tasks = [
        Task(r.slide_id, str(r.path), (str(work / "patches" / f"{r.slide_id}.h5"), r.slide_mpp))
        for r in shard.select(list(cohort))
    ]

    def is_done(task: Task) -> bool:
        fingerprint = _patch_fingerprint(task.args[0])
        if fingerprint is None:
            return False  # unreadable patch file: the stream records the failure
        return is_complete_feature_file(
            out_dir / f"{task.slide_id}.h5", spec.name, patch_fingerprint_=fingerprint,
            attrs=expected,
        )  # fmt: skip

    upstream = {r["slide_id"]: r for r in read_failures(work / "patches").to_dict("records")}
    plan = plan_slides(
        "extract", tasks, out_dir=out_dir, is_done=is_done,
        check=lambda task: _input_problem(task, upstream), strict=config.strict,
        source=work / "cohort.csv",
    )  # fmt: skip
    todo = plan.todo
    stream = None
    if todo:  # a finished folder needs no weights (and no download)
        encoder = get_encoder(
            config.encoder, config.weights, revision=config.revision, progress=not config.quiet
        )
        identity = {
            **_identity(encoder, config),
            "stain_normalization": expected["stain_normalization"],
            "augmentation": expected["augmentation"],
        }
        _check_same_features(out_dir, identity)
        write_resolved(
            out_dir / CONFIG_NAME, {"extract": config, "identity": {**identity, "device": device}}
        )
        stream = FeatureStream(
            encoder, todo, config, device, out_dir, identity, normalizer=normalizer
        )

    def remove_temps(task: Task) -> None:  # a killed run's, for a slide this process now holds
        atomic.remove_temps(out_dir, task.slide_id)

    try:
        summary = plan.run(
            stream.finish_slide if stream else _not_planned, workers=1, quiet=True,
            cleanup=remove_temps,
        )  # fmt: skip
    finally:
        if stream is not None:
            stream.close()
    if not config.quiet:
        rate = f" ({stream.patches_per_second:.1f} patches/s)" if stream else ""
        tqdm.write(f"{summary.line()}{rate} -> {out_dir}")
    return summary


def _not_planned(slide_id: str, *args: Any) -> None:
    raise ArtifactError(None, f"{slide_id} was finished when planned but not now; rerun")


def _input_problem(task: Task, upstream: dict[str, dict]) -> SlidemilError | None:
    """Why a slide cannot be encoded: its patch file is missing (with patching's own reason when
    patching recorded one) or unreadable, or its slide file is unusable; ``None`` when fine."""
    patch_path = task.args[0]
    problem = artifact_file_problem(patch_path, "patch", "run slidemil patch on this slide")
    if problem is not None and task.slide_id in upstream and not Path(patch_path).exists():
        return earlier_failure(upstream[task.slide_id])
    if problem is None:
        try:
            read_patch_file(patch_path)
        except SlidemilError as e:
            problem = e
    return problem or slide_file_problem(task.path)


def _patch_fingerprint(patch_path: str) -> str | None:
    """The patch set's fingerprint (``None``: unreadable, the stream reports it)."""
    try:
        return read_patch_file(patch_path).fingerprint
    except SlidemilError:
        return None


def _identity(encoder: Encoder, config: ExtractConfig) -> dict[str, Any]:
    return {
        "encoder": encoder.name,
        "weights_identity": encoder.weights_identity,
        "dtype": config.dtype,
        "transform": encoder.spec.transform.to_json(),
    }


def _fit_stain_normalizer(config: ExtractConfig) -> StainNormalizer | None:
    """The normaliser ``--stain-norm`` fits on ``--stain-target`` (once, in this process)."""
    if config.stain_norm is None:
        return None
    from slidemil.stain import fit_stain_normalizer

    return fit_stain_normalizer(config.stain_norm, config.stain_target)


def _check_same_features(out_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to mix features of other weights / transform / dtype / stain normalisation in one
    folder (other views are not refused: files holding other views are redone)."""
    record = out_dir / CONFIG_NAME
    if not record.is_file():
        return
    previous = read_yaml(record).get("identity") or {}
    for key, value in IDENTITY_DEFAULTS.items():  # recorded before the key existed
        previous.setdefault(key, value)
    changed = [k for k in FEATURE_IDENTITY_KEYS if k in previous and previous[k] != identity[k]]
    if changed:
        raise ConfigError(
            out_dir,
            f"holds features made with another {', '.join(changed)} "
            f"({', '.join(f'{k}={_shown(k, previous[k])}' for k in changed)})",
            "choose another --features-name or delete the folder",
        )


def _shown(key: str, value: Any) -> str:
    """A recorded identity value for a one-line message (a stain state by its method and
    target, not its fitted numbers)."""
    if key == "stain_normalization":
        from slidemil.stain.describe import describe_stain_state

        return describe_stain_state(value)
    return str(value)


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
        normalizer: StainNormalizer | None = None,
    ):
        import torch

        from slidemil.augmentation.views import Augmenter

        self.encoder, self.config, self.out_dir = encoder, config, out_dir
        self.normalizer = normalizer
        spec = config.augment_spec()
        self.augmenter = None if spec is None else Augmenter(spec)
        self.views = config.views
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.device)  # pinned batches and events on this rank's GPU
            torch.backends.cudnn.benchmark = True  # batches have one shape: tune kernels once
        # Channels-last on every device: cuDNN and oneDNN convolutions are faster on it (about
        # 30% for a ResNet on CPU), and the batches arrive in that layout anyway.
        self.model = encoder.model.to(self.device, memory_format=torch.channels_last)
        self.autocast = autocast_dtype(config.precision, encoder, self.device)
        self.store_dtype = getattr(torch, config.dtype)
        self.identity = {**identity, "precision": _dtype_name(self.autocast)}
        self.slides = [_load_slide(t) for t in todo]
        self.order = {s.slide_id: i for i, s in enumerate(self.slides)}
        total = sum(len(s) for s in self.slides if s.error is None)
        self.bar = tqdm(
            total=total, desc=f"extract {encoder.name}", unit="patch", dynamic_ncols=True,
            disable=config.quiet or total == 0, smoothing=0.05,
        )  # fmt: skip
        # JPEG tiles decoded on the GPU (workers only fetch their bytes), or by the workers
        decode = config.decode
        self.device_decode = decode == "device" or (decode == "auto" and self.cuda)
        # On the CPU the reader workers normalise and augment (in parallel with the encoder in
        # this process); on a GPU this process does, batched on the device.
        self.prepare_in_readers = (
            self.device.type == "cpu" and config.workers > 0 and not self.device_decode
            and (normalizer is not None or self.augmenter is not None)
        )  # fmt: skip
        self.patches_done = 0
        self.seconds = 0.0
        self._start = time.perf_counter()
        self._batches: Iterator[dict[str, Any]] | None = None
        self._restart_at = 0  # first slide of the next loader (after a worker crash)

    @property
    def patches_per_second(self) -> float:
        return self.patches_done / self.seconds if self.seconds > 0 else 0.0

    def _iterator(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import Subset

        if self._batches is None:
            readers_do = self.prepare_in_readers
            dataset: Any = PatchBatches(
                self.slides, self.config.batch_size, reader=self.config.reader,
                device_decode=self.device_decode,
                normalizer=self.normalizer if readers_do else None,
                augmenter=self.augmenter if readers_do else None,
            )  # fmt: skip
            if self._restart_at:
                first = next(
                    (j for j, r in enumerate(dataset.refs) if r.slide_index >= self._restart_at),
                    len(dataset.refs),
                )
                dataset = Subset(dataset, range(first, len(dataset.refs)))
            loader = make_loader(
                dataset, workers=self.config.workers, prefetch=self.config.prefetch,
                pin_memory=self.cuda,
            )  # fmt: skip
            self._batches = iter(loader)
        return self._batches

    def finish_slide(self, slide_id: str, patch_path: str, slide_mpp: float | None) -> int:
        """Encode the batches of ``slide_id`` (the runner's current slide) and write its file."""
        index = self.order.get(slide_id)
        if index is None:  # the runner and the stream disagree only if files changed mid-run
            raise ArtifactError(patch_path, "slide was not planned for extraction; rerun")
        slide = self.slides[index]
        for attempt in (1, 2):
            try:
                self._write_slide(index)
                break
            except Exception as e:
                if not _reader_died(e):
                    raise
                # A reader process died, maybe on a later slide it was reading ahead: a fresh
                # loader starts at this slide, which gets a second try before it is blamed.
                self._batches, self._restart_at = None, index
                if attempt == 2:
                    self._restart_at = index + 1
                    raise WorkerCrashError(
                        slide.slide_path,
                        f"a patch reader process died twice on this slide ({e})",
                        "check the slide file; a rerun retries it",
                    ) from e
        self.seconds = time.perf_counter() - self._start
        return len(slide)

    def _write_slide(self, index: int) -> None:
        slide = self.slides[index]
        if slide.error is not None:
            self._encode_until(index, None)  # its one empty batch
            raise slide.error
        with FeatureWriter(
            self.out_dir / f"{slide.slide_id}.h5", slide.patches.coords,
            dim=self.encoder.output_dim, dtype=self.config.dtype,
            attrs=_attrs(slide, self.identity), views=self.views,
        ) as out:  # fmt: skip
            error = self._encode_until(index, out)
            if error is not None:
                raise error  # the temp file is dropped; the slide goes to failures.csv

    def _encode_until(self, index: int, out: FeatureWriter | None) -> SlidemilError | None:
        """Consume batches up to and including slide ``index``'s last one; stream features out.

        Returns the first read error of the slide (its remaining batches are still consumed so
        the next slide starts at its own first batch). Raises :class:`_ReaderDiedError` when the
        loader broke.
        """
        error: SlidemilError | None = None
        copies: deque[tuple[Any, Any]] = deque()
        batches = self._iterator()
        while True:
            try:
                batch = next(batches)
            except Exception as e:  # a dead worker (segfault, OOM kill), or the loader ended
                raise _ReaderDiedError(f"{type(e).__name__}: {e}".replace("\n", " ")[:300]) from e
            if batch["slide_index"] < index:
                continue  # a slide the runner skipped since planning (finished by another shard)
            if batch["error"] is not None:
                error = error or batch["error"]
            elif batch_size_of(batch) > 0 and error is None and out is not None:
                slide = self.slides[batch["slide_index"]]
                try:  # JPEG tiles handed over undecoded are decoded here, on the device
                    images = device_images(batch, slide.patches.patch_size, self.device)
                except SlidemilError as e:
                    error = SlideReadError(slide.slide_path, e.problem)
                    images = None
                if images is not None:
                    coords = slide.patches.coords[batch["start"] : batch["stop"]]
                    features = self._forward(images, slide.slide_id, coords, batch["views"])
                    self._land(copies, features, out)
                    self.patches_done += features.shape[1]
                    self.bar.update(features.shape[1])
            if batch["last"]:
                while copies:
                    self._write_oldest(copies, out)
                return error

    def _forward(self, images: Any, slide_id: str, coords: Any, views: Any = None) -> Any:
        """Features (1 + K, B, D) in the stored dtype: the plain patches', then each view's.

        Stain normalisation, then augmentation run on the device in float32 (outside autocast),
        unless the readers did both (``views``: their (K, B, H, W, 3) views); ``coords`` (B, 2)
        level-0 px make each view reproducible whatever the batching.
        """
        import torch

        # NHWC uint8 from the workers; permuting gives an NCHW view with channels-last strides.
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        with torch.inference_mode():
            if views is not None or self.prepare_in_readers:
                made = [] if views is None else [v.permute(0, 3, 1, 2) for v in views]
                return torch.stack([self._encode(y) for y in (x, *made)])
            if self.normalizer is not None:
                x = self.normalizer(x).contiguous(memory_format=torch.channels_last)
            outputs = [self._encode(x)]
            if self.augmenter is not None:
                keys = self.augmenter.keys(slide_id, coords)
                outputs += [self._encode(self.augmenter(x, keys, v)) for v in range(self.views)]
            return torch.stack(outputs)

    def _encode(self, x: Any) -> Any:
        """The encoder's features (B, D) of uint8 images (B, 3, H, W), in the stored dtype."""
        with self._autocast_context():
            features = self.model(self.encoder.preprocess(x))
        if features.shape[1:] != (self.encoder.output_dim,):
            raise ArtifactError(
                None,
                f"encoder {self.encoder.name!r} gave {tuple(features.shape)}, expected "
                f"(B, {self.encoder.output_dim})",
            )
        return features.to(self.store_dtype)

    def _land(self, copies: deque[tuple[Any, Any]], features: Any, out: FeatureWriter) -> None:
        """Write ``features`` (1 + K, B, D) now (CPU) or after its async device->host copy has
        landed (CUDA)."""
        import torch

        if not self.cuda:
            _write(out, features.numpy())
            return
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        copies.append((host, landed))
        # Write what has already landed; wait only when too many copies are outstanding.
        while copies and (copies[0][1].query() or len(copies) > MAX_COPIES_IN_FLIGHT):
            self._write_oldest(copies, out)

    @staticmethod
    def _write_oldest(copies: deque[tuple[Any, Any]], out: FeatureWriter | None) -> None:
        host, landed = copies.popleft()
        landed.synchronize()
        if out is not None:
            _write(out, host.numpy())

    def _autocast_context(self) -> Any:
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def close(self) -> None:
        self.seconds = time.perf_counter() - self._start
        self.bar.close()
        self._batches = None  # shuts the DataLoader workers down


def _write(out: FeatureWriter, features: Any) -> None:
    """Hand a (1 + K, B, D) block to the writer: plain rows, and the K views when there are."""
    out.write(features[0], features[1:] if features.shape[0] > 1 else None)


class _ReaderDiedError(Exception):
    """The DataLoader stopped yielding: one of its worker processes died."""


def _reader_died(error: BaseException) -> bool:
    # PyTorch's SIGCHLD handler raises this RuntimeError wherever the main thread is when a
    # worker is killed, not only in ``next()``.
    return isinstance(error, _ReaderDiedError) or (
        isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker")
    )


def _load_slide(task: Task) -> SlidePatches:
    patch_path, slide_mpp = task.args
    try:
        patches = read_patch_file(patch_path)
    except SlidemilError as e:
        return SlidePatches(task.slide_id, task.path, None, slide_mpp, error=e)
    return SlidePatches(task.slide_id, task.path, patches, slide_mpp)


def _attrs(slide: SlidePatches, identity: dict[str, Any]) -> dict[str, Any]:
    patches = slide.patches
    return {
        "slide_id": slide.slide_id,
        "slide_path": slide.slide_path,
        "encoder": identity["encoder"],
        "weights": identity["weights_identity"],
        "transform": identity["transform"],
        "input_size": _input_size(identity, patches.patch_size),
        "precision": identity["precision"],
        "patch_fingerprint": patches.fingerprint,
        "augmentation": identity["augmentation"],
        "stain_normalization": identity["stain_normalization"],
        **patches.geometry(),
    }


def _input_size(identity: dict[str, Any], patch_size: int) -> int:
    import json

    transform = json.loads(identity["transform"])
    return int(transform.get("crop") or transform.get("resize") or patch_size)


def _dtype_name(dtype: Any) -> str:
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def autocast_dtype(precision: str, encoder: Encoder, device: Any) -> Any:
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
