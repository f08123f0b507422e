"""Streaming patch reading: one dataset over the patches of many slides, batched per slide.

Item ``j`` of :class:`PatchBatches` is one whole batch: ``batch_size`` patches of one slide
(batches never cross slides). DataLoader workers each open their own :class:`~slidemil.slide.Slide`
handles lazily, read and resize the patches and return uint8 tensors in NHWC order (no transpose
copy on the CPU: on the device the batch is viewed as channels-last NCHW); the main process only
moves them to the device and runs the encoder, so reading hides behind compute. A read failure
does not kill the loader: it comes back as a batch carrying the error, and the slide is recorded
as failed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from slidemil.errors import SlidemilError, SlideReadError
from slidemil.formats.patch_file import PatchSet
from slidemil.slide import Slide

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
    (uint8 tensor (B, patch_size, patch_size, 3), NHWC) and ``error`` (a
    :class:`~slidemil.errors.SlidemilError`, or ``None``).
    """

    def __init__(self, slides: list[SlidePatches], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.slides = slides
        self.refs = plan_batches(slides, batch_size)
        self._handles: OrderedDict[str, Slide] = OrderedDict()
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
            "last": ref.last, "error": None,
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
            images = self._read(slide, ref.start, ref.stop)
        except SlidemilError as e:
            item["images"], item["error"] = empty, e
            if not isinstance(e, SlideReadError):  # unopenable slide: every batch would fail
                self._broken[slide.slide_path] = e
            return item
        except Exception as e:  # noqa: BLE001 - any decoder failure fails this slide, not the run
            error = SlideReadError(slide.slide_path, f"reading patches: {type(e).__name__}: {e}")
            item["images"], item["error"] = empty, error
            return item
        item["images"] = torch.from_numpy(images)
        return item

    def _read(self, slide: SlidePatches, start: int, stop: int) -> np.ndarray:
        patches = slide.patches
        handle = self._handle(slide)
        size, read = patches.patch_size, patches.read_size
        out = np.empty((stop - start, size, size, 3), dtype=np.uint8)
        for row, (x, y) in enumerate(patches.coords[start:stop]):
            region = handle.read_region((int(x), int(y)), patches.read_level, (read, read))
            if read != size:
                interp = cv2.INTER_AREA if read > size else cv2.INTER_LINEAR
                region = cv2.resize(region, (size, size), interpolation=interp)
            out[row] = region
        return out

    def _handle(self, slide: SlidePatches) -> Slide:
        handle = self._handles.get(slide.slide_path)
        if handle is None:
            handle = Slide(Path(slide.slide_path), mpp_override=slide.slide_mpp)
            self._handles[slide.slide_path] = handle
            while len(self._handles) > OPEN_HANDLES_PER_WORKER:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(slide.slide_path)
        return handle


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
