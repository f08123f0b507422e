"""Decode one stored tile to RGB the way OpenSlide does, with imagecodecs.

- JPEG: the level's shared ``JPEGTables`` (tag 347) are loaded first, and the colour space comes
  from the TIFF photometric tag, not from markers inside the stream (Aperio writes RGB JPEG
  tiles that a decoder left to guess would treat as YCbCr).
- Aperio JPEG 2000: 33003 holds Y, Cb, Cr components (converted here with the JFIF equations,
  subsampled chroma repeated), 33005 holds RGB (the codestream's own transform).
- LZW, deflate (both tag values), PackBits and none, with the horizontal-differencing predictor.

:func:`standalone_jpeg` makes a tile's bytes a complete JPEG stream (tables merged in, colour
space declared by an Adobe marker) for decoders that take whole files, such as
``torchvision.io.decode_jpeg``.
"""

from __future__ import annotations

import imagecodecs
import numpy as np

from slidemil.readers.tiff_layout import (
    APERIO_JP2K,
    COMPRESSION_ADOBE_DEFLATE,
    COMPRESSION_APERIO_JP2K_YCBCR,
    COMPRESSION_DEFLATE,
    COMPRESSION_JPEG,
    COMPRESSION_LZW,
    COMPRESSION_NONE,
    COMPRESSION_PACKBITS,
    PHOTOMETRIC_YCBCR,
    PREDICTOR_HORIZONTAL,
    TileLevel,
)

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
APP0, APP14 = 0xE0, 0xEE
# Markers without a length field: SOI, EOI, TEM and the restart markers.
_STANDALONE_MARKERS = {0xD8, 0xD9, 0x01, *range(0xD0, 0xD8)}


def jpeg_colorspace(level: TileLevel) -> str:
    """``"YCBCR"`` or ``"RGB"``: how the level's JPEG tiles are coded, from the photometric tag."""
    return "YCBCR" if level.photometric == PHOTOMETRIC_YCBCR else "RGB"


def decode_tile(level: TileLevel, data: bytes) -> np.ndarray:
    """RGB uint8 (tile_height, tile_width, 3) of one tile's stored bytes; raises ``ValueError``
    (or the codec's error) when the bytes do not decode to a tile of the level's size."""
    shape = (level.tile_height, level.tile_width, 3)
    compression = level.compression
    if compression == COMPRESSION_JPEG:
        colorspace = jpeg_colorspace(level)
        image = imagecodecs.jpeg8_decode(
            data, tables=level.jpeg_tables, colorspace=colorspace, outcolorspace="RGB"
        )
    elif compression in APERIO_JP2K:
        image = _decode_aperio_jp2k(data, compression, shape)
    else:
        image = _decode_lossless(level, data, shape)
    if image.shape != shape:
        raise ValueError(
            f"tile decodes to {image.shape[1]}x{image.shape[0]}, not {shape[1]}x{shape[0]}"
        )
    return image


def _decode_lossless(level: TileLevel, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    compression = level.compression
    if compression == COMPRESSION_NONE:
        raw = data
    elif compression == COMPRESSION_LZW:
        raw = imagecodecs.lzw_decode(data)
    elif compression in (COMPRESSION_ADOBE_DEFLATE, COMPRESSION_DEFLATE):
        raw = imagecodecs.zlib_decode(data)
    elif compression == COMPRESSION_PACKBITS:
        raw = imagecodecs.packbits_decode(data)
    else:
        raise ValueError(f"compression {compression} is not a tile codec")
    size = shape[0] * shape[1] * shape[2]
    if len(raw) < size:
        raise ValueError(f"tile holds {len(raw)} bytes, a {shape[1]}x{shape[0]} tile needs {size}")
    image = np.frombuffer(raw, np.uint8, count=size).reshape(shape)
    if level.predictor == PREDICTOR_HORIZONTAL:
        image = imagecodecs.delta_decode(image, axis=-2)  # running sum along each row
    return image


def _decode_aperio_jp2k(data: bytes, compression: int, shape: tuple[int, int, int]) -> np.ndarray:
    components = imagecodecs.jpeg2k_decode(data)
    if compression != COMPRESSION_APERIO_JP2K_YCBCR:
        return components
    return ycbcr_to_rgb(components[..., 0], components[..., 1], components[..., 2])


def _round_half_away(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def _ycbcr_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # JFIF (full-range BT.601) YCbCr -> RGB in integers: R and B offsets rounded, G in 16-bit
    # fixed point with the rounding folded into one term; the same integers OpenSlide uses.
    c = np.arange(256, dtype=np.float64) - 128
    r_cr = _round_half_away(1.402 * c).astype(np.int64)
    g_cb = _round_half_away(65536 * (0.5 - 0.34414 * c)).astype(np.int64)
    g_cr = _round_half_away(65536 * -0.71414 * c).astype(np.int64)
    b_cb = _round_half_away(1.772 * c).astype(np.int64)
    return r_cr, g_cb, g_cr, b_cb


_R_CR, _G_CB, _G_CR, _B_CB = _ycbcr_tables()


def ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) from full-resolution Y, Cb, Cr uint8 planes (JFIF equations)."""
    y = y.astype(np.int64)
    rgb = np.empty((*y.shape, 3), np.int64)
    rgb[..., 0] = y + _R_CR[cr]
    rgb[..., 1] = y + ((_G_CB[cb] + _G_CR[cr]) >> 16)
    rgb[..., 2] = y + _B_CB[cb]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def standalone_jpeg(level: TileLevel, data: bytes) -> bytes:
    """A complete JPEG stream for one tile: the level's tables spliced in after SOI and an Adobe
    APP14 marker saying RGB or YCbCr (JFIF and Adobe markers of the tile are dropped, since a
    decoder trusts them over the TIFF photometric tag)."""
    if data[:2] != SOI:
        raise ValueError("tile does not start with a JPEG SOI marker")
    tables = b""
    if level.jpeg_tables:
        t = level.jpeg_tables
        start = 2 if t[:2] == SOI else 0
        end = len(t) - 2 if t[-2:] == EOI else len(t)
        tables = t[start:end]
    transform = 1 if jpeg_colorspace(level) == "YCBCR" else 0
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])
    return SOI + adobe + tables + _without_colour_markers(data[2:])


def _without_colour_markers(body: bytes) -> bytes:
    """``body`` (a stream after SOI) without its APP0 (JFIF) and APP14 (Adobe) segments."""
    out, pos = [], 0
    while pos + 4 <= len(body) and body[pos] == 0xFF:
        marker = body[pos + 1]
        if marker in _STANDALONE_MARKERS:
            break
        length = int.from_bytes(body[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data follows, copy the rest
            break
        if marker not in (APP0, APP14):
            out.append(body[pos : pos + 2 + length])
        pos += 2 + length
    out.append(body[pos:])
    return b"".join(out)
