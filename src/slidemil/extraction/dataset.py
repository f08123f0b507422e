"""Streaming patch reading: one dataset over the patches of many slides, batched per slide.

Item ``j`` of :class:`PatchBatches` is one whole batch: ``batch_size`` patches of one slide
(batches never cross slides). DataLoader workers each open their own slide readers lazily
(:func:`~slidemil.readers.pick_reader`, ``reader`` chosen by the caller), read a batch's patches in
one batched read, resize them and return uint8 tensors in NHWC order (no transpose copy on the
CPU: on the device the batch is viewed as channels-last NCHW); the main process only moves them to
the device and runs the encoder, so reading hides behind compute. With ``device_decode`` a worker
reading JPEG tiles with the tile reader returns the raw tiles instead (``jpeg``: a
:class:`~slidemil.readers.device_decode.JpegPatchBatch`), for the main process to decode on the
GPU (:func:`device_images`), so the CPU cores only do file I/O. Given a stain normaliser and an
augmenter (extraction on the CPU), the workers also normalise the patches and make their
augmented views, so the main process only encodes. A read failure
does not kill the loader: it comes back as a batch carrying the error, and the slide is recorded
as failed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidemil.errors import SlidemilError, SlideReadError
from slidemil.formats.patch_file import PatchSet
from slidemil.readers.choice import ReaderName, pick_reader
from slidemil.readers.device_decode import can_fetch_jpeg, fetch_jpeg_patches
from slidemil.readers.patches import read_patches
from slidemil.readers.protocol import SlideReader

OPEN_HANDLES_PER_WORKER = 2  # the slide being read and the next one


@dataclass(frozen=True)
class SlidePatches:
    """The patches of one slide to encode (``error`` set when its patch file was unusable)."""

    slide_id: str
    slide_path: str
    patches: PatchSet | None
    slide_mpp: float | None = None
    error: SlidemilError | None = None

    def __len__(self) -> int:
        return 0 if self.patches is None else len(self.patches)


@dataclass(frozen=True)
class BatchRef:
    slide_index: int
    start: int
    stop: int
    last: bool  # the slide's last batch


def plan_batches(slides: list[SlidePatches], batch_size: int) -> list[BatchRef]:
    """Cut every slide into batches; a slide with no patches (or an error) gets one empty batch,
    so the consumer still hears about it in order."""
    refs: list[BatchRef] = []
    for index, slide in enumerate(slides):
        n = len(slide) if slide.error is None else 0
        starts = list(range(0, n, batch_size)) or [0]
        for start in starts:
            stop = min(start + batch_size, n)
            refs.append(BatchRef(index, start, stop, last=stop >= n))
    return refs


class PatchBatches:
    """Map-style dataset: item ``j`` is the ``j``-th batch as a dict.

    Keys: ``slide_index`` (int), ``start``/``stop`` (patch rows), ``last`` (bool), ``images``
    (uint8 tensor (B, patch_size, patch_size, 3), NHWC), ``jpeg`` (the raw tiles of the batch
    instead of ``images``, only with ``device_decode``; else ``None``), ``views`` (uint8
    (K, B, patch_size, patch_size, 3), only with an ``augmenter``; else ``None``), ``reader``
    (the reader used, ``"openslide"`` or ``"tiles"``) and ``error`` (a
    :class:`~slidemil.errors.SlidemilError`, or ``None``).

    Args:
        reader: ``auto``, ``openslide`` or ``tiles`` (see :func:`~slidemil.readers.pick_reader`).
        device_decode: hand JPEG tiles read by the tile reader to the main process undecoded.
        normalizer: a stain normaliser applied to ``images`` here (on the CPU).
        augmenter: an :class:`~slidemil.augmentation.views.Augmenter` whose views of the
            (normalised) images are made here (on the CPU).
    """

    def __init__(
        self,
        slides: list[SlidePatches],
        batch_size: int,
        reader: ReaderName = "auto",
        device_decode: bool = False,
        normalizer: Any = None,
        augmenter: Any = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device_decode and (normalizer is not None or augmenter is not None):
            raise ValueError("tiles decoded on the device cannot be augmented by the readers")
        self.slides = slides
        self.refs = plan_batches(slides, batch_size)
        self.reader = reader
        self.device_decode = device_decode
        self.normalizer = normalizer
        self.augmenter = augmenter
        self._handles: OrderedDict[str, SlideReader] = OrderedDict()
        self._broken: dict[str, SlidemilError] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict[str, Any]:
        # Each worker opens its own handles: OpenSlide objects do not cross processes.
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def __getitem__(self, j: int) -> dict[str, Any]:
        import torch

        ref = self.refs[j]
        slide = self.slides[ref.slide_index]
        item: dict[str, Any] = {
            "slide_index": ref.slide_index, "start": ref.start, "stop": ref.stop,
            "last": ref.last, "error": None, "jpeg": None, "reader": None, "views": None,
        }  # fmt: skip
        size = slide.patches.patch_size if slide.patches is not None else 1
        empty = torch.zeros((0, size, size, 3), dtype=torch.uint8)
        if slide.error is not None or ref.stop <= ref.start:
            item["images"] = empty
            return item
        broken = self._broken.get(slide.slide_path)
        if broken is not None:  # a slide that failed once is not reopened for every batch
            item["images"], item["error"] = empty, broken
            return item
        try:
            images, item["reader"] = self._read(slide, ref.start, ref.stop)
        except SlidemilError as e:
            item["images"], item["error"] = empty, e
            if not isinstance(e, SlideReadError):  # unopenable slide: every batch would fail
                self._broken[slide.slide_path] = e
            return item
        except Exception as e:  # noqa: BLE001 - any decoder failure fails this slide, not the run
            error = SlideReadError(slide.slide_path, f"reading patches: {type(e).__name__}: {e}")
            item["images"], item["error"] = empty, error
            return item
        if isinstance(images, np.ndarray):
            item["images"] = torch.from_numpy(images)
            if self.normalizer is not None or self.augmenter is not None:
                coords = slide.patches.coords[ref.start : ref.stop]
                item["images"], item["views"] = self._prepare(item["images"], slide, coords)
        else:
            item["images"], item["jpeg"] = empty, images
        return item

    def _prepare(self, images: Any, slide: SlidePatches, coords: np.ndarray) -> tuple[Any, Any]:
        """Stain-normalised images (NHWC) and their views ((K, B, H, W, 3), or ``None``)."""
        import torch

        x = images.permute(0, 3, 1, 2)
        with torch.no_grad():  # not inference mode: these tensors go to shared memory
            if self.normalizer is not None:
                x = self.normalizer(x)
                images = x.permute(0, 2, 3, 1).contiguous()
            if self.augmenter is None:
                return images, None
            keys = self.augmenter.keys(slide.slide_id, coords)
            views = [self.augmenter(x, keys, v) for v in range(self.augmenter.views)]
            return images, torch.stack([v.permute(0, 2, 3, 1) for v in views])

    def _read(self, slide: SlidePatches, start: int, stop: int) -> tuple[Any, str]:
        """The batch's patches (RGB NHWC, or their raw JPEG tiles) and the reader's name."""
        patches = slide.patches
        handle = self._handle(slide)
        coords = patches.coords[start:stop]
        level, read = patches.read_level, patches.read_size
        if self.device_decode and can_fetch_jpeg(handle, level):
            return fetch_jpeg_patches(handle, coords.tolist(), level, (read, read)), handle.name
        return read_patches(handle, coords, level, read, patches.patch_size), handle.name

    def _handle(self, slide: SlidePatches) -> SlideReader:
        handle = self._handles.get(slide.slide_path)
        if handle is None:
            handle = pick_reader(Path(slide.slide_path), self.reader)
            self._handles[slide.slide_path] = handle
            while len(self._handles) > OPEN_HANDLES_PER_WORKER:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(slide.slide_path)
        return handle


def device_images(batch: dict[str, Any], patch_size: int, device: Any) -> Any:
    """The batch's uint8 NHWC images on ``device``: its ``jpeg`` tiles decoded and resized to
    ``patch_size`` px there, or its ``images`` moved there."""
    if batch.get("jpeg") is None:
        return batch["images"].to(device, non_blocking=True)
    from slidemil.readers.device_decode import decode_jpeg_patches, resize_patches

    try:
        return resize_patches(decode_jpeg_patches(batch["jpeg"], device), patch_size)
    except (ValueError, RuntimeError) as e:  # a tile that no decoder takes (corrupt)
        raise SlideReadError(None, f"decoding JPEG tiles: {e}") from e


def batch_size_of(batch: dict[str, Any]) -> int:
    """Patches in a batch (its decoded images or its raw JPEG tiles)."""
    jpeg = batch.get("jpeg")
    return len(jpeg) if jpeg is not None else int(batch["images"].shape[0])


def make_loader(dataset: Any, *, workers: int, pin_memory: bool, prefetch: int) -> Any:
    """A DataLoader yielding whole batches in order, ``prefetch`` batches ahead per worker."""
    from torch.utils.data import DataLoader

    options: dict[str, Any] = {}
    if workers > 0:
        # Forked workers; no OpenCV thread setting in them (it deadlocks on the parent's pool).
        options = {"prefetch_factor": prefetch, "persistent_workers": False}
    return DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        **options,
    )  # fmt: skip
