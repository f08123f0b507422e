"""Automatic tissue segmentation on a low-resolution image of a slide (pure functions on arrays).

The method is the one CLAM made standard, with areas in µm² so one set of parameters fits slides
of any resolution: the HSV saturation channel (glass is grey, stained tissue is coloured) is
median-blurred, thresholded (fixed or Otsu), closed morphologically, and its contours are kept
when their area net of holes reaches ``min_tissue_area_um2``; holes of at least
``min_hole_area_um2`` (the ``max_n_holes`` largest per piece) stay out of the tissue.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

# The thresholded image's value for tissue; contours are traced on it.
FOREGROUND = 255


@dataclass(frozen=True)
class TissueParams:
    """Segmentation parameters (CLAM's names in brackets).

    Args:
        sthresh: saturation threshold, 0-255 [sthresh]; with ``use_otsu`` the lower bound of Otsu's.
        sthresh_up: value given to pixels above the threshold [sthresh_up].
        mthresh: median blur kernel in px at the segmentation level, odd [mthresh].
        close: morphological closing kernel in px at the segmentation level, 0 = none [close].
        use_otsu: Otsu's threshold on the blurred saturation instead of ``sthresh`` [use_otsu].
        min_tissue_area_um2: smallest tissue piece kept, net of its holes, in µm² [a_t].
        min_hole_area_um2: smallest hole kept out of the tissue, in µm²; smaller ones count as
            tissue [a_h].
        max_n_holes: most holes kept per tissue piece, largest first [max_n_holes].
    """

    sthresh: int = 8
    sthresh_up: int = 255
    mthresh: int = 7
    close: int = 4
    use_otsu: bool = False
    min_tissue_area_um2: float = 10_000.0
    min_hole_area_um2: float = 2_000.0
    max_n_holes: int = 8

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TissueMask:
    """Tissue of one slide: a boolean mask and the outlines it was drawn from.

    ``mask`` is (h, w) at ``downsample`` level-0 px per mask px. ``contours`` and ``holes``
    (one list per contour) are (K, 2) float arrays of x, y in **level-0 px**, for previews.
    ``source`` says where the tissue came from: ``"segmentation"`` or the user mask's path.
    """

    mask: np.ndarray
    downsample: float
    contours: list[np.ndarray] = field(default_factory=list)
    holes: list[list[np.ndarray]] = field(default_factory=list)
    source: str = "segmentation"

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation_threshold(rgb: np.ndarray, params: TissueParams) -> np.ndarray:
    """Binary uint8 image (0 / ``sthresh_up``) of coloured pixels after blur and closing."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {rgb.shape}")
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2HSV)[..., 1]
    kernel = max(1, int(params.mthresh)) | 1  # medianBlur needs an odd size
    blurred = cv2.medianBlur(saturation, kernel)
    threshold = float(params.sthresh)
    if params.use_otsu:
        otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        # On a blank slide Otsu splits the glass noise; the fixed threshold is a floor.
        threshold = max(otsu, threshold)
    _, binary = cv2.threshold(blurred, threshold, params.sthresh_up, cv2.THRESH_BINARY)
    if params.close > 0:
        square = np.ones((int(params.close), int(params.close)), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, square)
    return binary


def filter_contours(
    binary: np.ndarray, pixel_area_um2: float, params: TissueParams
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Tissue contours and their holes, in the image's px, filtered by area.

    Args:
        binary: uint8 image, non-zero = tissue.
        pixel_area_um2: area of one image pixel in µm² (``(mpp × downsample)²``).
    """
    found, hierarchy = cv2.findContours(
        (binary > 0).astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE
    )
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy[0]  # rows: next, previous, first child, parent
    min_tissue_px = params.min_tissue_area_um2 / pixel_area_um2
    min_hole_px = params.min_hole_area_um2 / pixel_area_um2
    contours: list[np.ndarray] = []
    holes: list[list[np.ndarray]] = []
    for index in np.flatnonzero(hierarchy[:, 3] == -1):
        children = _children(hierarchy, index)
        hole_areas = [cv2.contourArea(found[c]) for c in children]
        net_area = cv2.contourArea(found[index]) - sum(hole_areas)
        if net_area <= 0 or net_area < min_tissue_px:
            continue
        kept = sorted(
            (c for c, area in zip(children, hole_areas, strict=True) if area >= min_hole_px),
            key=lambda c: -cv2.contourArea(found[c]),
        )[: params.max_n_holes]
        contours.append(found[index].reshape(-1, 2))
        holes.append([found[c].reshape(-1, 2) for c in kept])
    return contours, holes


def _children(hierarchy: np.ndarray, parent: int) -> list[int]:
    children = []
    child = int(hierarchy[parent, 2])
    while child != -1:
        children.append(child)
        child = int(hierarchy[child, 0])
    return children


def rasterize(
    shape: tuple[int, int], contours: list[np.ndarray], holes: list[list[np.ndarray]]
) -> np.ndarray:
    """Boolean (h, w) mask: inside a contour and outside its holes (coordinates in mask px)."""
    canvas = np.zeros(shape, np.uint8)
    for contour, contour_holes in zip(contours, holes, strict=True):
        cv2.fillPoly(canvas, [np.round(contour).astype(np.int32)], 1)
        if contour_holes:
            cv2.fillPoly(canvas, [np.round(h).astype(np.int32) for h in contour_holes], 0)
    return canvas.astype(bool)


def segment_tissue(
    rgb: np.ndarray, downsample: float, slide_mpp: float, params: TissueParams | None = None
) -> TissueMask:
    """Segment tissue in ``rgb``, a slide image at ``downsample`` (level-0 px per image px).

    Args:
        rgb: (h, w, 3) uint8 image of the whole slide.
        downsample: level-0 px per image px.
        slide_mpp: level-0 µm/px, to turn the µm² area limits into px.
    """
    params = params or TissueParams()
    pixel_area_um2 = (slide_mpp * downsample) ** 2
    binary = saturation_threshold(rgb, params)
    contours, holes = filter_contours(binary, pixel_area_um2, params)
    mask = rasterize(binary.shape, contours, holes)
    return TissueMask(
        mask=mask,
        downsample=float(downsample),
        contours=[c.astype(np.float64) * downsample for c in contours],
        holes=[[h.astype(np.float64) * downsample for h in hs] for hs in holes],
    )


def outlines_of(mask: np.ndarray, downsample: float) -> tuple[list, list]:
    """Contours and holes (level-0 px) of an existing boolean mask, for previews."""
    found, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return [], []
    hierarchy = hierarchy[0]
    contours, holes = [], []
    for index in np.flatnonzero(hierarchy[:, 3] == -1):
        contours.append(found[index].reshape(-1, 2) * float(downsample))
        holes.append(
            [found[c].reshape(-1, 2) * float(downsample) for c in _children(hierarchy, index)]
        )
    return contours, holes


def segmentation_level(level_dimensions: tuple[tuple[int, int], ...], target_size: int) -> int:
    """The pyramid level whose longer side is nearest ``target_size`` px (log scale; a tie goes
    to the smaller level, which is cheaper to read)."""
    best, best_distance = 0, math.inf
    for level, (width, height) in enumerate(level_dimensions):
        distance = abs(math.log(max(width, height) / float(target_size)))
        if distance <= best_distance + 1e-9:  # levels get smaller as the index grows
            best, best_distance = level, distance
    return best
