"""Tissue segmentation on synthetic arrays, and user masks (images and GeoJSON polygons)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from slidemil.errors import MaskError
from slidemil.tissue import TissueParams, load_user_mask, segment_tissue, segmentation_level

GLASS = (243, 243, 241)
STAIN = (220, 120, 190)
MPP = 2.0  # µm per image px in these tests: 1 px = 4 µm²


def _image(size=400):
    image = np.full((size, size, 3), GLASS, np.uint8)
    cv2.circle(image, (200, 200), 120, STAIN, -1)
    return image


def test_tissue_found_and_big_hole_kept_out():
    image = _image()
    cv2.circle(image, (200, 200), 30, GLASS, -1)  # hole: π·30² px ≈ 11 300 µm²
    tissue = segment_tissue(image, downsample=1.0, slide_mpp=MPP)
    assert tissue.mask[200, 110], "tissue ring missing"
    assert not tissue.mask[200, 200], "the hole must stay out of the tissue"
    assert not tissue.mask[10, 10], "glass counted as tissue"
    assert len(tissue.contours) == 1 and len(tissue.holes[0]) == 1
    assert 0.2 < tissue.tissue_fraction < 0.35


def test_small_hole_filled_and_debris_dropped():
    image = _image()
    cv2.circle(image, (200, 200), 8, GLASS, -1)  # ≈ 800 µm² < min_hole_area_um2
    cv2.circle(image, (30, 30), 4, STAIN, -1)  # ≈ 200 µm² < min_tissue_area_um2
    cv2.circle(image, (370, 30), 4, STAIN, -1)
    tissue = segment_tissue(image, 1.0, MPP, TissueParams(close=0))
    assert tissue.mask[200, 200], "a hole below min_hole_area_um2 is tissue"
    assert not tissue.mask[30, 30] and not tissue.mask[30, 370], "debris must be dropped"
    assert len(tissue.contours) == 1


def test_areas_are_physical():
    """The same µm² limit drops a piece at a coarse resolution that it keeps at a fine one."""
    image = np.full((200, 200, 3), GLASS, np.uint8)
    cv2.circle(image, (100, 100), 22, STAIN, -1)  # ≈ 1 450 px inside the contour
    params = TissueParams(min_tissue_area_um2=5_000)
    assert segment_tissue(image, 1.0, 2.0, params).mask.any()  # ≈ 5 800 µm² at 4 µm²/px
    assert not segment_tissue(image, 1.0, 1.0, params).mask.any()  # ≈ 1 450 µm²


def test_level0_coordinates_of_contours():
    tissue = segment_tissue(_image(), downsample=8.0, slide_mpp=0.5)
    xs = tissue.contours[0][:, 0]
    assert 80 * 8 - 16 <= xs.min() <= 80 * 8 + 16  # circle from x = 80 to 320 in image px
    assert tissue.downsample == 8.0


def test_otsu_on_blank_glass_finds_nothing():
    rng = np.random.default_rng(0)
    image = np.clip(np.full((256, 256, 3), GLASS) + rng.normal(0, 2, (256, 256, 3)), 0, 255)
    tissue = segment_tissue(image.astype(np.uint8), 1.0, MPP, TissueParams(use_otsu=True))
    assert not tissue.mask.any()
    tissue = segment_tissue(_image(), 1.0, MPP, TissueParams(use_otsu=True))
    assert tissue.mask[200, 200]


def test_segmentation_level_nearest_target():
    dims = ((100_000, 80_000), (25_000, 20_000), (6_250, 5_000), (1_562, 1_250))
    assert segmentation_level(dims, 2048) == 3
    assert segmentation_level(dims, 8000) == 2
    assert segmentation_level(((2048, 1500), (512, 375)), 2048) == 0


def test_png_mask_at_any_downsample(tmp_path):
    labels = np.zeros((100, 150), np.uint8)
    labels[20:60, 30:90] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), labels)
    tissue = load_user_mask(tmp_path / "mask.png", (1500, 1000))
    assert tissue.downsample == pytest.approx(10.0)
    assert tissue.mask[40, 60] and not tissue.mask[80, 10]
    assert tissue.source.endswith("mask.png")
    assert tissue.contours and tissue.contours[0][:, 0].min() == pytest.approx(300, abs=10)


def test_tiff_mask(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "mask.tif", np.ones((50, 50), np.uint8))
    assert load_user_mask(tmp_path / "mask.tif", (800, 800)).mask.all()


def test_mask_with_wrong_aspect_is_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "mask.png"), np.full((100, 100), 255, np.uint8))
    with pytest.raises(MaskError, match=r"mask\.png.*differ"):
        load_user_mask(tmp_path / "mask.png", (2000, 1000))


def test_empty_and_unknown_masks_are_refused(tmp_path):
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(MaskError, match="no tissue"):
        load_user_mask(tmp_path / "empty.png", (100, 100))
    (tmp_path / "mask.xyz").write_text("?")
    with pytest.raises(MaskError, match="unknown mask type"):
        load_user_mask(tmp_path / "mask.xyz", (100, 100))
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        load_user_mask(tmp_path / "bad.geojson", (100, 100))


def test_geojson_polygon_with_hole(tmp_path):
    outer = [[1000, 1000], [5000, 1000], [5000, 5000], [1000, 5000], [1000, 1000]]
    hole = [[2500, 2500], [3500, 2500], [3500, 3500], [2500, 3500], [2500, 2500]]
    features = [  # QuPath exports a list of features
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
         "properties": {"objectType": "annotation"}},
    ]  # fmt: skip
    (tmp_path / "tissue.geojson").write_text(json.dumps(features))
    tissue = load_user_mask(tmp_path / "tissue.geojson", (8000, 6000), rasterize_size=800)
    ds = tissue.downsample
    assert ds == pytest.approx(10.0)
    assert tissue.mask[int(2000 / ds), int(2000 / ds)]
    assert not tissue.mask[int(3000 / ds), int(3000 / ds)], "interior ring is a hole"
    assert not tissue.mask[int(5500 / ds), int(5500 / ds)]
    assert len(tissue.holes[0]) == 1
