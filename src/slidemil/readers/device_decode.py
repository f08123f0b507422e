"""JPEG patches decoded in batches on a torch device (nvJPEG on CUDA, libjpeg-turbo on the CPU).

Split in two so the CPU cores only do file I/O:

- :func:`fetch_jpeg_patches` (in a reader worker) collects, for a batch of patches of one
  level, the raw bytes of every JPEG tile they cover, each made a standalone stream (the level's
  ``JPEGTables`` merged in, the colour space declared), plus each patch's window on the level.
  Patches the device path cannot take (a negative location, a tile OpenSlide paints from another
  level) are read on the CPU right there and travel decoded.
- :func:`decode_jpeg_patches` (in the main process) decodes the streams with one
  ``torchvision.io.decode_jpeg(list, device=...)`` call, then gathers each patch from the decoded
  tiles on the device, with the same sub-pixel (bilinear) placement and white outside the image
  as :class:`~slidemil.readers.tile_reader.TileReader`.

A tile the device decoder refuses is decoded on the CPU (imagecodecs, colour space forced from
the TIFF tag) and moved over; and the first tile of each colour space a device decodes is checked
against that CPU decode, so a decoder that ignores the Adobe colour marker (RGB-coded Aperio
tiles) is noticed once and its tiles of that colour space go to the CPU from then on.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import imagecodecs
import numpy as np

from slidemil.readers.tiff_layout import COMPRESSION_JPEG
from slidemil.readers.tile_codecs import jpeg_colorspace, standalone_jpeg
from slidemil.readers.tile_reader import TileReader

log = logging.getLogger(__name__)

# Mean absolute difference (levels of 255) above which a device decode of a tile disagrees with
# the CPU decoder's colours (a colour-space mix-up is tens of levels; decoder IDCT differences
# are below 1).
COLOUR_CHECK_TOLERANCE = 4.0
# (device type, colour space) -> whether the device decoder gives the right colours
_DEVICE_COLOURS_OK: dict[tuple[str, str], bool] = {}


@dataclass
class JpegPatchBatch:
    """Raw JPEG tiles of a batch of same-size patches of one level, and where each patch lies.

    Sizes and positions are level px. ``windows[i]`` is patch ``i``'s (x, y) integer origin on
    the level, ``fractions[i]`` its sub-pixel offset (0 <= f < 1). ``tile_keys[k]`` is the
    (column, row) of ``streams[k]`` in the level's tile grid; ``decoded`` holds patches read on
    the CPU instead (row -> RGB uint8 (h, w, 3)).
    """

    size: tuple[int, int]
    level_size: tuple[int, int]
    tile_size: tuple[int, int]
    colorspace: str
    windows: np.ndarray
    fractions: np.ndarray
    tile_keys: np.ndarray
    streams: list[np.ndarray] = field(default_factory=list)
    decoded: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.windows)


def can_fetch_jpeg(reader: Any, level: int) -> bool:
    """Whether ``reader``'s ``level`` is JPEG tiles the device path decodes."""
    return (
        isinstance(reader, TileReader) and reader.level_info(level).compression == COMPRESSION_JPEG
    )


def fetch_jpeg_patches(
    reader: TileReader, locations: Sequence[tuple[int, int]], level: int, size: tuple[int, int]
) -> JpegPatchBatch:
    """The raw tiles and windows of ``size`` (w, h) px patches at ``level`` (a worker's job)."""
    info = reader.level_info(level)
    ds = reader.level_downsamples[level]
    width, height = int(size[0]), int(size[1])
    n = len(locations)
    windows = np.zeros((n, 2), np.int64)
    fractions = np.zeros((n, 2), np.float64)
    decoded: dict[int, np.ndarray] = {}
    needed: dict[tuple[int, int], None] = {}
    tw, th = info.tile_width, info.tile_height
    for row, (x, y) in enumerate(locations):
        x, y = int(x), int(y)
        if x < 0 or y < 0 or reader.needs_openslide(level, x, y, width, height):
            decoded[row] = reader.read_region((x, y), level, (width, height))
            continue
        fx, fy = x / ds, y / ds
        ix, iy = math.floor(fx), math.floor(fy)
        windows[row] = ix, iy
        fractions[row] = fx - ix, fy - iy
        x1 = min(ix + width + 1, info.width)  # one extra px for the bilinear neighbour
        y1 = min(iy + height + 1, info.height)
        for r in range(iy // th, (y1 - 1) // th + 1 if y1 > iy else 0):
            for c in range(ix // tw, (x1 - 1) // tw + 1 if x1 > ix else 0):
                if r * info.tiles_across + c not in info.missing:
                    needed[(c, r)] = None
    keys = np.array(list(needed), np.int64).reshape(-1, 2)
    streams = [
        np.frombuffer(  # a writable buffer: torch.from_numpy shares it without a warning
            bytearray(
                standalone_jpeg(info, reader.raw_tile(level, int(r) * info.tiles_across + int(c)))
            ),
            np.uint8,
        )
        for c, r in keys
    ]
    return JpegPatchBatch(
        size=(width, height),
        level_size=(info.width, info.height),
        tile_size=(tw, th),
        colorspace=jpeg_colorspace(info),
        windows=windows,
        fractions=fractions,
        tile_keys=keys,
        streams=streams,
        decoded=decoded,
    )


def decode_jpeg_patches(batch: JpegPatchBatch, device: Any, placement: str | None = None) -> Any:
    """uint8 tensor (N, h, w, 3) on ``device``: the batch's patches, decoded and placed there.

    ``placement``: how patches are cut from the decoded tiles, ``"gather"`` (the default on
    CUDA) or ``"slices"`` (the default elsewhere); the pixels are the same.
    """
    import torch

    device = torch.device(device)
    width, height = batch.size
    n = len(batch)
    out = torch.full((n, height, width, 3), 255, dtype=torch.uint8, device=device)
    rows = [i for i in range(n) if i not in batch.decoded]
    if rows and len(batch.streams):
        tiles = decode_streams(batch.streams, batch.colorspace, batch.tile_size, device)
        out[rows] = _place(batch, tiles, rows, device, placement)
    for row, image in batch.decoded.items():
        out[row] = torch.from_numpy(image).to(device)
    return out


def decode_streams(
    streams: Sequence[np.ndarray], colorspace: str, tile_size: tuple[int, int], device: Any
) -> Any:
    """uint8 tensor (K, tile_h, tile_w, 3) on ``device`` of standalone JPEG ``streams``."""
    import torch

    device = torch.device(device)
    tw, th = tile_size
    tiles = torch.empty((len(streams), th, tw, 3), dtype=torch.uint8, device=device)
    on_device = list(range(len(streams)))
    if not _device_colours_ok(device, colorspace, streams[0]):
        on_device = []
    # streams may be views of read-only file bytes; torch wants writable memory (a copy)
    tensors = [torch.from_numpy(np.require(streams[i], requirements="W")) for i in on_device]
    images: list[Any] = []
    if tensors:
        try:
            images = _torchvision_decode(tensors, device)
        except RuntimeError:  # one bad tile fails the whole call: decode them one by one
            images = [_decode_one(t, device) for t in tensors]
    refused = set(range(len(streams))) - set(on_device)
    for i, image in zip(on_device, images, strict=True):
        if image is None or tuple(image.shape) != (3, th, tw):
            refused.add(i)
            continue
        tiles[i] = image.permute(1, 2, 0)
    for i in sorted(refused):
        tiles[i] = torch.from_numpy(cpu_decode(streams[i], colorspace, tile_size)).to(device)
    return tiles


def cpu_decode(stream: np.ndarray, colorspace: str, tile_size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (tile_h, tile_w, 3) of a standalone stream, by imagecodecs on the CPU."""
    image = imagecodecs.jpeg8_decode(stream.tobytes(), colorspace=colorspace, outcolorspace="RGB")
    tw, th = tile_size
    if image.shape != (th, tw, 3):
        raise ValueError(f"JPEG tile decodes to {image.shape[1]}x{image.shape[0]}, not {tw}x{th}")
    return image


def _decode_one(tensor: Any, device: Any) -> Any:
    try:
        return _torchvision_decode(tensor, device)
    except RuntimeError:
        return None


def _torchvision_decode(data: Any, device: Any) -> Any:
    """``torchvision.io.decode_jpeg`` to RGB on ``device`` (one tensor or a list of them)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 announces a move to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _device_colours_ok(device: Any, colorspace: str, stream: np.ndarray) -> bool:
    """Whether ``device``'s decoder gives ``colorspace`` tiles the CPU decoder's colours (checked
    once per device type and colour space, on the first tile seen)."""
    key = (device.type, colorspace)
    if key not in _DEVICE_COLOURS_OK:
        import torch

        image = _decode_one(torch.from_numpy(stream), device)
        try:
            reference = imagecodecs.jpeg8_decode(
                stream.tobytes(), colorspace=colorspace, outcolorspace="RGB"
            )
        except Exception:  # noqa: BLE001 - an undecodable first tile says nothing about colours
            return True
        ok = image is not None and tuple(image.shape) == (3, *reference.shape[:2])
        if ok:
            got = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
            ok = float(np.abs(got - reference).mean()) <= COLOUR_CHECK_TOLERANCE
        if not ok:
            log.warning(
                "%s JPEG decoder gives other colours for %s tiles; decoding them on the CPU",
                device.type, colorspace,
            )  # fmt: skip
        _DEVICE_COLOURS_OK[key] = ok
    return _DEVICE_COLOURS_OK[key]


def _place(
    batch: JpegPatchBatch, tiles: Any, rows: list[int], device: Any, method: str | None = None
) -> Any:
    """(len(rows), h, w, 3) uint8: each patch cut from the decoded tiles on the device.

    ``method``: ``"gather"`` (one indexed gather for the whole batch: few kernel launches, the
    choice on CUDA) or ``"slices"`` (one copy per patch and tile: memcpy speed, the choice on the
    CPU, where indexed gathers are slow); both give the same pixels.
    """
    import torch

    method = method or ("gather" if device.type == "cuda" else "slices")
    width, height = batch.size
    fractions = torch.as_tensor(batch.fractions[rows], dtype=torch.float32, device=device)
    interpolate = bool((fractions > 0).any())
    size = (width + interpolate, height + interpolate)
    cut = _windows_by_gather if method == "gather" else _windows_by_slices
    window, valid = cut(batch, tiles, rows, size, device)
    if not interpolate:
        return torch.where(valid[..., None], window, torch.full_like(window, 255))
    alpha = valid.to(torch.float32)[..., None] * 255.0
    rgba = torch.cat([window.to(torch.float32), alpha], dim=-1)  # premultiplied (0 outside)
    fx = fractions[:, 0].view(-1, 1, 1, 1)
    fy = fractions[:, 1].view(-1, 1, 1, 1)
    top = rgba[:, :height, :width] * (1 - fx) + rgba[:, :height, 1:] * fx
    bottom = rgba[:, 1:, :width] * (1 - fx) + rgba[:, 1:, 1:] * fx
    mixed = top * (1 - fy) + bottom * fy
    rgb = mixed[..., :3] + (255.0 - mixed[..., 3:])
    return rgb.round().clamp(0, 255).to(torch.uint8)


def _windows_by_slices(
    batch: JpegPatchBatch, tiles: Any, rows: list[int], size: tuple[int, int], device: Any
) -> tuple[Any, Any]:
    """(n, wh, ww, 3) uint8 windows and (n, wh, ww) validity, one slice copy per patch and tile."""
    import torch

    ww, wh = size
    level_w, level_h = batch.level_size
    tw, th = batch.tile_size
    index = {(int(c), int(r)): k for k, (c, r) in enumerate(batch.tile_keys)}
    window = torch.zeros((len(rows), wh, ww, 3), dtype=torch.uint8, device=device)
    valid = torch.zeros((len(rows), wh, ww), dtype=torch.bool, device=device)
    for j, row in enumerate(rows):
        ix, iy = (int(v) for v in batch.windows[row])
        x1, y1 = min(ix + ww, level_w), min(iy + wh, level_h)
        for r in range(iy // th, (y1 - 1) // th + 1 if y1 > iy else 0):
            for c in range(ix // tw, (x1 - 1) // tw + 1 if x1 > ix else 0):
                k = index.get((c, r))
                if k is None:  # a missing tile: transparent
                    continue
                sx0, sy0 = max(ix, c * tw), max(iy, r * th)
                sx1, sy1 = min(x1, (c + 1) * tw), min(y1, (r + 1) * th)
                dst = (j, slice(sy0 - iy, sy1 - iy), slice(sx0 - ix, sx1 - ix))
                window[dst] = tiles[k, sy0 - r * th : sy1 - r * th, sx0 - c * tw : sx1 - c * tw]
                valid[dst] = True
    return window, valid


def _windows_by_gather(
    batch: JpegPatchBatch, tiles: Any, rows: list[int], size: tuple[int, int], device: Any
) -> tuple[Any, Any]:
    """(n, wh, ww, 3) uint8 windows and (n, wh, ww) validity, by one indexed gather."""
    import torch

    ww, wh = size
    level_w, level_h = batch.level_size
    tw, th = batch.tile_size
    k = len(tiles)
    keys = torch.as_tensor(batch.tile_keys, device=device)
    col0, row0 = int(keys[:, 0].min()), int(keys[:, 1].min())
    lut_w = int(keys[:, 0].max()) - col0 + 1
    lut_h = int(keys[:, 1].max()) - row0 + 1
    lut = torch.full((lut_h, lut_w), -1, dtype=torch.int64, device=device)
    lut[keys[:, 1] - row0, keys[:, 0] - col0] = torch.arange(k, device=device)
    windows = torch.as_tensor(batch.windows[rows], device=device)
    gx = windows[:, :1] + torch.arange(ww, device=device)  # (n, ww) level px
    gy = windows[:, 1:] + torch.arange(wh, device=device)  # (n, wh)
    inside = (gy < level_h)[:, :, None] & (gx < level_w)[:, None, :]
    col, row = gx // tw - col0, gy // th - row0
    col_ok = (col >= 0) & (col < lut_w)
    row_ok = (row >= 0) & (row < lut_h)
    tile = lut[row.clamp(0, lut_h - 1)[:, :, None], col.clamp(0, lut_w - 1)[:, None, :]]
    valid = inside & row_ok[:, :, None] & col_ok[:, None, :] & (tile >= 0)
    flat = tile * (th * tw) + ((gy % th) * tw)[:, :, None] + (gx % tw)[:, None, :]
    flat = torch.where(valid, flat, torch.full_like(flat, k * th * tw))  # -> the blank pixel
    blank = torch.zeros((1, 3), dtype=torch.uint8, device=device)
    pixels = torch.cat([tiles.reshape(-1, 3), blank])
    return pixels[flat], valid


def resize_patches(images: Any, size: int) -> Any:
    """uint8 (N, size, size, 3) of uint8 NHWC ``images`` resized on their device: area
    averaging when shrinking, bilinear when growing (as OpenCV's INTER_AREA / INTER_LINEAR)."""
    import torch.nn.functional as F

    h, w = images.shape[1:3]
    if (h, w) == (size, size):
        return images
    x = images.permute(0, 3, 1, 2).float()
    if h > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(images.dtype).permute(0, 2, 3, 1).contiguous()
