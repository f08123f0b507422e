"""Periodic H&E-like texture tiles for the synthetic slides.

Each tissue kind (normal stroma and one lesion kind per class) is a :class:`TissueStyle`: a
background stain colour with fibre-like modulation and a population of nuclei (colour, size,
elongation, arrangement). A style renders to a periodic square texture at a given µm/px, so
slides sample it anywhere without seams. The period (500 µm) is deliberately not a multiple of
common patch sizes, so patches on a grid see many different parts of it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

PERIOD_UM = 500.0


@dataclass(frozen=True)
class TissueStyle:
    name: str
    background: tuple[int, int, int]  # RGB of the cytoplasm / matrix
    fibre_strength: float  # 0..1 amplitude of the fibrous modulation
    nucleus_color: tuple[int, int, int]
    nucleus_radius_um: tuple[float, float]  # (along, across) radius
    nuclei_per_mm2: float
    arrangement: str = "random"  # random | rings | aligned
    granule_color: tuple[int, int, int] | None = None
    granules_per_mm2: float = 0.0


STROMA = TissueStyle("stroma", (236, 176, 206), 0.55, (96, 52, 136), (4.0, 1.4), 1500, "random")

# One lesion kind per class; classes beyond these get parametric styles (see lesion_style).
LESION_STYLES = (
    TissueStyle("lymphoid", (214, 160, 204), 0.1, (58, 28, 112), (2.6, 2.4), 9000),
    TissueStyle("vesicular", (226, 182, 214), 0.15, (148, 104, 186), (6.5, 5.5), 2600),
    TissueStyle("glandular", (230, 168, 200), 0.2, (84, 40, 128), (3.2, 2.4), 5000, "rings"),
    TissueStyle("spindle", (222, 150, 186), 0.6, (92, 44, 120), (9.0, 1.6), 5200, "aligned"),
    TissueStyle("mucinous", (200, 202, 228), 0.3, (110, 70, 150), (3.5, 3.0), 700),
    TissueStyle("eosinophilic", (242, 118, 160), 0.2, (100, 50, 140), (4.0, 3.5), 2400),
    TissueStyle(
        "necrotic",
        (206, 178, 190),
        0.4,
        (104, 62, 124),
        (1.3, 1.0),
        16000,
        granule_color=(170, 150, 160),
        granules_per_mm2=6000,
    ),
    TissueStyle(
        "pigmented",
        (228, 178, 196),
        0.3,
        (100, 56, 136),
        (3.5, 3.0),
        2000,
        granule_color=(130, 84, 42),
        granules_per_mm2=7000,
    ),
)


def lesion_style(class_index: int) -> TissueStyle:
    """The lesion style of a class: a fixed one for the first eight, parametric after that."""
    if class_index < len(LESION_STYLES):
        return LESION_STYLES[class_index]
    rng = np.random.default_rng(1000 + class_index)
    background = tuple(int(v) for v in rng.integers(170, 245, 3))
    nucleus = tuple(int(v) for v in rng.integers(40, 160, 3))
    along = float(rng.uniform(1.5, 8.0))
    return TissueStyle(
        f"lesion{class_index}",
        background,  # type: ignore[arg-type]
        float(rng.uniform(0.1, 0.6)),
        nucleus,  # type: ignore[arg-type]
        (along, float(rng.uniform(1.2, along))),
        float(rng.uniform(1000, 12000)),
        str(rng.choice(["random", "rings", "aligned"])),
    )


@lru_cache(maxsize=64)
def texture(style: TissueStyle, mpp: float, seed: int = 0) -> np.ndarray:
    """Periodic RGB uint8 texture of ``style`` at ``mpp`` µm/px, period ``PERIOD_UM`` µm."""
    period = max(8, round(PERIOD_UM / mpp))
    rng = np.random.default_rng([seed, zlib.crc32(style.name.encode())])
    image = _background(style, period, mpp, rng)
    _draw_nuclei(image, style, period, mpp, rng)
    if style.granule_color is not None and style.granules_per_mm2 > 0:
        granules = TissueStyle(
            "granules",
            style.background,
            0,
            style.granule_color,
            (1.6, 1.2),
            style.granules_per_mm2,
        )
        _draw_nuclei(image, granules, period, mpp, rng)
    return image


@lru_cache(maxsize=256)
def texture_at(style: TissueStyle, mpp: float, downsample: float, seed: int = 0) -> np.ndarray:
    """The texture as it looks at ``downsample`` (area-averaged), for lower pyramid levels."""
    base = texture(style, mpp, seed)
    if downsample <= 1.0:
        return base
    size = max(2, round(base.shape[0] / downsample))
    return cv2.resize(base, (size, size), interpolation=cv2.INTER_AREA)


def sample_periodic(tex: np.ndarray, x0: float, y0: float, width: int, height: int) -> np.ndarray:
    """A ``height x width`` window of a periodic texture starting at texture pixel (x0, y0)."""
    period_y, period_x = tex.shape[:2]
    xs = (math.floor(x0) + np.arange(width)) % period_x
    ys = (math.floor(y0) + np.arange(height)) % period_y
    return tex[ys[:, None], xs[None, :]]


def _periodic_noise(shape: int, sigma_px: tuple[float, float], rng) -> np.ndarray:
    """Gaussian-filtered white noise, periodic by construction (filtered in Fourier space)."""
    noise = rng.standard_normal((shape, shape)).astype(np.float32)
    fy = np.fft.fftfreq(shape)[:, None]
    fx = np.fft.rfftfreq(shape)[None, :]
    sy, sx = sigma_px
    gain = np.exp(-2 * (math.pi**2) * ((fy * sy) ** 2 + (fx * sx) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(shape, shape)).astype(np.float32)
    return out / (out.std() + 1e-6)


def _background(style: TissueStyle, period: int, mpp: float, rng) -> np.ndarray:
    # Fibres: noise stretched along x, plus a fine grain everywhere.
    fibres = _periodic_noise(period, (1.5 / mpp, 12.0 / mpp), rng)
    grain = _periodic_noise(period, (0.8 / mpp, 0.8 / mpp), rng)
    shade = 1.0 + 0.07 * style.fibre_strength * fibres + 0.025 * grain
    background = np.asarray(style.background, np.float32)
    # Scale optical density rather than intensity, as stain concentration does.
    density = (255.0 - background)[None, None, :] * shade[..., None]
    return np.clip(255.0 - density, 0, 255).astype(np.uint8)


def _draw_nuclei(image: np.ndarray, style: TissueStyle, period: int, mpp: float, rng) -> None:
    area_mm2 = (period * mpp / 1000.0) ** 2
    count = rng.poisson(style.nuclei_per_mm2 * area_mm2)
    centers = _arrange(style.arrangement, count, period, mpp, rng)
    along, across = style.nucleus_radius_um
    base_angle = rng.uniform(0, 180)
    color = np.asarray(style.nucleus_color, np.float32)
    shift = 4  # sub-pixel precision for cv2 drawing
    for cx, cy in centers:
        a = max(0.6, along / mpp * rng.uniform(0.8, 1.2))
        b = max(0.6, across / mpp * rng.uniform(0.8, 1.2))
        if style.arrangement == "aligned":
            angle = base_angle + rng.normal(0, 8)
        else:
            angle = rng.uniform(0, 180)
        tone = tuple(float(c) for c in np.clip(color * rng.uniform(0.85, 1.15), 0, 255))
        # Draw at the centre and its periodic images near the borders so the texture wraps.
        for dx in (-period, 0, period):
            for dy in (-period, 0, period):
                x, y = cx + dx, cy + dy
                if -2 * a <= x <= period + 2 * a and -2 * a <= y <= period + 2 * a:
                    cv2.ellipse(
                        image,
                        (round(x * 2**shift), round(y * 2**shift)),
                        (round(a * 2**shift), round(b * 2**shift)),
                        angle,
                        0,
                        360,
                        tone,
                        -1,
                        cv2.LINE_AA,
                        shift,
                    )


def _arrange(arrangement: str, count: int, period: int, mpp: float, rng) -> np.ndarray:
    if arrangement != "rings" or count == 0:
        return rng.uniform(0, period, size=(count, 2))
    # Gland-like: nuclei on circles around lumens of 12-25 µm radius.
    points = []
    while len(points) < count:
        cx, cy = rng.uniform(0, period, 2)
        radius = rng.uniform(12, 25) / mpp
        n = max(6, int(2 * math.pi * radius * mpp / 6.5))
        angles = rng.uniform(0, 2 * math.pi) + np.linspace(0, 2 * math.pi, n, endpoint=False)
        points.extend(zip(cx + radius * np.cos(angles), cy + radius * np.sin(angles), strict=True))
    return np.asarray(points[:count]) % period
