"""Patch files: the slidemil layout round-trips; CLAM and TRIDENT files are read as those tools
write them (``tests/foreign_files.py``)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from foreign_files import write_clam_patch_file, write_legacy_coords_file, write_trident_patch_file
from slidemil.errors import ArtifactError
from slidemil.formats.patch_file import (
    PatchSet,
    is_complete_patch_file,
    read_patch_file,
    write_patch_file,
)
from slidemil.slide import Slide

COORDS = np.array([[0, 0], [512, 0], [1024, 512]], np.int64)


def test_slidemil_round_trip_is_clam_readable(tmp_path):
    patches = PatchSet(
        coords=COORDS, patch_size=256, read_level=0, read_size=512, target_downsample=2.0,
        slide_id="s1", step=256, target_mpp=0.5, slide_mpp=0.25, slide_dimensions=(4096, 3000),
        min_tissue=0.5, segmentation={"sthresh": 8},
    )  # fmt: skip
    path = write_patch_file(tmp_path / "s1.h5", patches)
    back = read_patch_file(path)
    assert np.array_equal(back.coords, COORDS)
    assert back.patch_size_level0 == 512.0 and back.read_size == 512
    assert back.segmentation == {"sthresh": 8} and back.source_format == "slidemil"
    with h5py.File(path, "r") as f:  # what CLAM-style readers look for
        assert f["coords"].attrs["patch_level"] == 0 and f["coords"].attrs["patch_size"] == 512
    assert is_complete_patch_file(path)


def test_clam_file(tmp_path):
    # CLAM reads 256 px at level 1 (downsample 4) of a 2048 x 1536 slide
    path = write_clam_patch_file(tmp_path, "clam_slide", [COORDS], patch_size=256, patch_level=1,
                                 level_downsample=(4.0, 4.0), level_dim=(512, 384))  # fmt: skip
    patches = read_patch_file(path)
    assert patches.source_format == "clam"
    assert patches.read_level == 1 and patches.read_size == 256 and patches.patch_size == 256
    assert patches.target_downsample == 4.0 and patches.patch_size_level0 == 1024.0
    assert patches.slide_dimensions == (2048, 1536) and patches.slide_id == "clam_slide"
    assert np.array_equal(patches.coords, COORDS)
    assert not is_complete_patch_file(path), "only our own files skip work"


def test_old_clam_file_needs_the_slide(tmp_path, small_cohort):
    write_legacy_coords_file(tmp_path / "old.h5", COORDS, patch_size=256, patch_level=1)
    with pytest.raises(ArtifactError, match=r"old\.h5.*downsample"):
        read_patch_file(tmp_path / "old.h5")
    with Slide(small_cohort / "slides" / "slide_0000.svs") as slide:
        patches = read_patch_file(tmp_path / "old.h5", slide=slide)
        assert patches.target_downsample == pytest.approx(slide.level_downsamples[1])
        assert patches.slide_mpp == pytest.approx(0.5)
        assert patches.target_mpp == pytest.approx(0.5 * slide.level_downsamples[1])


def test_trident_file(tmp_path, small_cohort):
    # 256 px at 20x of a 40x slide, with 32 px of overlap
    path = write_trident_patch_file(tmp_path, "tri", COORDS, patch_size=256, src_mag=40,
                                    target_mag=20, width=2048, height=1536, overlap=32)  # fmt: skip
    patches = read_patch_file(path)
    assert patches.source_format == "trident"
    assert patches.patch_size == 256 and patches.target_downsample == 2.0
    assert patches.read_level == 0 and patches.read_size == 512
    assert patches.magnification == 20 and patches.step == 224 and patches.slide_id == "tri"
    assert patches.slide_dimensions == (2048, 1536)
    with Slide(small_cohort / "slides" / "slide_0000.svs") as slide:
        with_slide = read_patch_file(path, slide=slide)
    assert with_slide.read_level == 0 and with_slide.read_size == 512
    assert with_slide.target_mpp == pytest.approx(1.0)  # 0.5 µm/px slide, downsample 2


def test_bad_files(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("coords", data=COORDS)
    with pytest.raises(ArtifactError, match=r"other\.h5.*neither"):
        read_patch_file(tmp_path / "other.h5")
    with h5py.File(tmp_path / "features.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((2, 4)))
    with pytest.raises(ArtifactError, match="no 'coords'"):
        read_patch_file(tmp_path / "features.h5")
    with pytest.raises(ArtifactError, match="not found"):
        read_patch_file(tmp_path / "missing.h5")


def test_truncated_file_is_not_complete(tmp_path):
    patches = PatchSet(coords=COORDS, patch_size=256, read_level=0, read_size=256,
                       target_downsample=1.0)  # fmt: skip
    path = write_patch_file(tmp_path / "s.h5", patches)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not is_complete_patch_file(path)
    with pytest.raises(ArtifactError, match="truncated"):
        read_patch_file(path)
