"""The content of one synthetic slide, defined analytically in level-0 pixels.

Tissue is a union of wobbly ellipses minus small holes; lesions are wobbly ellipses clipped to
tissue. Because every shape is a formula, any region renders at any downsample without holding
the slide in memory, every pyramid level agrees with level 0, and the ground truth (tissue and
lesion masks) is exact at any resolution. A scene round-trips through JSON (``truth/*.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from slidemil.synthetic.sites import SiteStain
from slidemil.synthetic.textures import STROMA, lesion_style, sample_periodic, texture_at

GLASS = (243, 243, 241)
# Masks are evaluated on a grid this many level-0 px apart, then enlarged: boundaries are
# accurate to ~2 µm at 0.5 µm/px while costing 1/16 of a per-pixel evaluation.
MASK_STEP_LEVEL0 = 4.0

LABEL_GLASS, LABEL_TISSUE, LABEL_LESION = 0, 1, 2


@dataclass(frozen=True)
class Blob:
    """An ellipse (level-0 px, angle in radians) with a boundary wobble of a few harmonics."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    wobble: tuple[tuple[float, int, float], ...] = ()  # (amplitude, harmonic, phase)

    @property
    def reach(self) -> float:
        return max(self.rx, self.ry) * (1 + sum(abs(a) for a, _, _ in self.wobble))

    def intersects(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        r = self.reach
        return not (self.cx + r < x0 or self.cx - r > x1 or self.cy + r < y0 or self.cy - r > y1)

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Boolean membership of points; ``xs``/``ys`` broadcast (level-0 px)."""
        dx, dy = xs - self.cx, ys - self.cy
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = (dx * cos + dy * sin) / self.rx
        v = (-dx * sin + dy * cos) / self.ry
        radius = np.sqrt(u * u + v * v)
        limit = 1.0
        if self.wobble:
            theta = np.arctan2(v, u)
            limit = 1.0 + sum(a * np.sin(k * theta + p) for a, k, p in self.wobble)
        return radius < limit


@dataclass
class SlideScene:
    """Everything needed to render a synthetic slide and its ground truth."""

    width: int
    height: int
    mpp: float
    class_index: int
    texture_seed: int = 0
    stain_gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    site_stain: SiteStain | None = None  # the hospital site's staining and scanner (--sites)
    tissue: list[Blob] = field(default_factory=list)
    holes: list[Blob] = field(default_factory=list)
    lesions: list[Blob] = field(default_factory=list)

    # -- masks ------------------------------------------------------------------------------------
    def _grid(self, x0, y0, width, height, downsample, step):
        xs = x0 + (np.arange(0, width, step) + 0.5 * step) * downsample
        ys = y0 + (np.arange(0, height, step) + 0.5 * step) * downsample
        return xs[None, :], ys[:, None]

    def masks(
        self, x0: float, y0: float, width: int, height: int, downsample: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, lesion) boolean masks of a ``height x width`` region at ``downsample``,
        whose top-left is level-0 (x0, y0)."""
        step = max(1, int(MASK_STEP_LEVEL0 / downsample))
        xs, ys = self._grid(x0, y0, width, height, downsample, step)
        bounds = (x0, y0, x0 + width * downsample, y0 + height * downsample)
        shape = (ys.shape[0], xs.shape[1])
        tissue = _union(self.tissue, xs, ys, bounds, shape)
        if tissue.any():
            tissue &= ~_union(self.holes, xs, ys, bounds, shape)
        lesion = _union(self.lesions, xs, ys, bounds, shape) & tissue if tissue.any() else tissue
        if step > 1:
            tissue = _enlarge(tissue, step, width, height)
            lesion = _enlarge(lesion, step, width, height)
        return tissue, lesion

    def label_map(self, downsample: float) -> np.ndarray:
        """Whole-slide uint8 labels at ``downsample``: 0 glass, 1 tissue, 2 lesion."""
        width = max(1, round(self.width / downsample))
        height = max(1, round(self.height / downsample))
        tissue, lesion = self.masks(0, 0, width, height, downsample)
        labels = tissue.astype(np.uint8) * LABEL_TISSUE
        labels[lesion] = LABEL_LESION
        return labels

    # -- pixels -----------------------------------------------------------------------------------
    def render(
        self, x0: float, y0: float, width: int, height: int, downsample: float = 1.0
    ) -> np.ndarray:
        """RGB uint8 image of a region: ``width x height`` px at ``downsample`` from level-0
        (x0, y0)."""
        image = np.empty((height, width, 3), np.uint8)
        image[:] = GLASS
        tissue, lesion = self.masks(x0, y0, width, height, downsample)
        if not tissue.any():
            return image if self.site_stain is None else self.site_stain.apply(image)
        tx, ty = x0 / downsample, y0 / downsample
        stroma = sample_periodic(
            texture_at(STROMA, self.mpp, downsample, self.texture_seed), tx, ty, width, height
        )
        image[tissue] = stroma[tissue]
        if lesion.any():
            style = lesion_style(self.class_index)
            lesion_tex = texture_at(style, self.mpp, downsample, self.texture_seed + 1)
            image[lesion] = sample_periodic(lesion_tex, tx, ty, width, height)[lesion]
        image = _apply_stain_gain(image, self.stain_gain)
        return image if self.site_stain is None else self.site_stain.apply(image)

    # -- serialisation ----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SlideScene:
        data = json.loads(text)
        site = data.get("site_stain")  # absent in scenes written before --sites

        def blobs(items):
            return [Blob(**{**b, "wobble": tuple(tuple(w) for w in b["wobble"])}) for b in items]

        return cls(
            width=data["width"],
            height=data["height"],
            mpp=data["mpp"],
            class_index=data["class_index"],
            texture_seed=data["texture_seed"],
            stain_gain=tuple(data["stain_gain"]),
            site_stain=None if site is None else SiteStain.from_dict(site),
            tissue=blobs(data["tissue"]),
            holes=blobs(data["holes"]),
            lesions=blobs(data["lesions"]),
        )

    @classmethod
    def load(cls, path: str | Path) -> SlideScene:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _union(blobs, xs, ys, bounds, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for blob in blobs:
        if blob.intersects(*bounds):
            mask |= blob.contains(xs, ys)
    return mask


def _enlarge(mask: np.ndarray, step: int, width: int, height: int) -> np.ndarray:
    big = np.repeat(np.repeat(mask, step, axis=0), step, axis=1)
    return big[:height, :width]


def _apply_stain_gain(image: np.ndarray, gain: tuple[float, float, float]) -> np.ndarray:
    if gain == (1.0, 1.0, 1.0):
        return image
    lut = np.stack(
        [np.clip(255.0 - (255.0 - np.arange(256)) * g, 0, 255) for g in gain], axis=1
    ).astype(np.uint8)
    return cv2.merge([cv2.LUT(image[..., c], lut[:, c]) for c in range(3)])


# -- scene generation ---------------------------------------------------------------------------
def random_wobble(rng, total: float) -> tuple[tuple[float, int, float], ...]:
    harmonics = rng.choice(np.arange(2, 8), size=3, replace=False)
    amplitudes = rng.dirichlet(np.ones(3)) * total
    phases = rng.uniform(0, 2 * math.pi, 3)
    return tuple(
        (float(a), int(k), float(p)) for a, k, p in zip(amplitudes, harmonics, phases, strict=True)
    )


def make_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    mpp: float,
    class_index: int,
    *,
    lesion_fraction: tuple[float, float] = (0.05, 0.12),
    texture_seed: int = 0,
) -> SlideScene:
    """A random scene: 1-3 tissue pieces with holes and 1-3 lesions of the class's kind covering
    ``lesion_fraction`` of the tissue area (so the class is not visible in the slide's mean
    colour)."""
    n_pieces = int(rng.integers(1, 4))
    column = width / n_pieces
    tissue = []
    for i in range(n_pieces):
        tissue.append(
            Blob(
                cx=float(column * (i + 0.5) + rng.uniform(-0.08, 0.08) * column),
                cy=float(height * rng.uniform(0.42, 0.58)),
                rx=float(column * rng.uniform(0.30, 0.42)),
                ry=float(height * rng.uniform(0.26, 0.38)),
                angle=float(rng.uniform(-0.4, 0.4)),
                wobble=random_wobble(rng, rng.uniform(0.12, 0.22)),
            )
        )
    scene = SlideScene(
        width=width,
        height=height,
        mpp=mpp,
        class_index=class_index,
        texture_seed=texture_seed,
        stain_gain=tuple(float(g) for g in rng.uniform(0.85, 1.15, 3)),
        tissue=tissue,
    )
    scene.holes = [_hole(rng, scene) for _ in range(int(rng.integers(1, 4)) * n_pieces)]

    # Lesion radii from the tissue area, estimated on a coarse label map.
    coarse_ds = max(width, height) / 256
    tissue_area = float((scene.label_map(coarse_ds) > 0).sum()) * coarse_ds**2
    n_lesions = int(rng.integers(1, 4))
    fraction = rng.uniform(*lesion_fraction)
    shares = rng.dirichlet(np.ones(n_lesions) * 3)
    for share in shares:
        radius = math.sqrt(max(share * fraction * tissue_area, 1.0) / math.pi)
        center = _point_inside_tissue(rng, scene, radius)
        if center is None:
            continue
        aspect = rng.uniform(0.7, 1.0)
        scene.lesions.append(
            Blob(
                cx=center[0],
                cy=center[1],
                rx=float(radius / math.sqrt(aspect)),
                ry=float(radius * math.sqrt(aspect)),
                angle=float(rng.uniform(0, math.pi)),
                wobble=random_wobble(rng, 0.15),
            )
        )
    if not scene.lesions:  # tiny slides: put one lesion at the biggest piece's centre
        piece = max(tissue, key=lambda b: b.rx * b.ry)
        radius = math.sqrt(fraction * tissue_area / math.pi)
        scene.lesions.append(Blob(piece.cx, piece.cy, radius, radius))
    return scene


def _hole(rng, scene: SlideScene) -> Blob:
    piece = scene.tissue[int(rng.integers(len(scene.tissue)))]
    angle = rng.uniform(0, 2 * math.pi)
    distance = rng.uniform(0, 0.6)
    radius = min(piece.rx, piece.ry) * rng.uniform(0.03, 0.08)
    return Blob(
        cx=float(piece.cx + distance * piece.rx * math.cos(angle)),
        cy=float(piece.cy + distance * piece.ry * math.sin(angle)),
        rx=float(radius * rng.uniform(1.0, 1.6)),
        ry=float(radius),
        angle=float(rng.uniform(0, math.pi)),
    )


def _point_inside_tissue(rng, scene: SlideScene, radius: float) -> tuple[float, float] | None:
    """A point whose surrounding circle of ``radius`` lies mostly in tissue."""
    ring = np.linspace(0, 2 * math.pi, 12, endpoint=False)
    for _ in range(400):
        x = float(rng.uniform(0, scene.width))
        y = float(rng.uniform(0, scene.height))
        xs = np.concatenate([[x], x + 0.8 * radius * np.cos(ring)])
        ys = np.concatenate([[y], y + 0.8 * radius * np.sin(ring)])
        inside = _union(scene.tissue, xs, ys, (0, 0, scene.width, scene.height), xs.shape)
        if inside.mean() > 0.9:
            return x, y
    return None
