"""Feature files: slidemil's own layout written atomically, and CLAM's and TRIDENT's files read
as those tools write them (``tests/foreign_files.py``)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from foreign_files import (
    trident_coords_dir,
    trident_grid,
    write_clam_features,
    write_trident_features,
    write_trident_patch_file,
)
from slidemil.errors import ArtifactError
from slidemil.formats.feature_file import (
    FeatureWriter,
    is_complete_feature_file,
    read_feature_attrs,
    read_feature_file,
    write_feature_file,
)
from slidemil.training.bags import probe_feature_file

RNG = np.random.default_rng(0)


def _bag(n: int = 37, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    features = RNG.normal(size=(n, dim)).astype(np.float32)
    coords = np.stack([np.arange(n) * 256, np.arange(n) * 512], axis=1).astype(np.int64)
    return features, coords


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_keeps_rows_dtype_and_attributes(tmp_path, dtype):
    features, coords = _bag()
    path = write_feature_file(
        tmp_path / "s1.h5", features.astype(dtype), coords,
        {"slide_id": "s1", "encoder": "resnet18", "weights": "random:seed=0", "patch_size": 256},
    )  # fmt: skip
    bag = read_feature_file(path, dtype=None)
    assert bag.features.dtype == np.dtype(dtype) and bag.dim == 24 and len(bag) == 37
    np.testing.assert_allclose(bag.features, features, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(bag.coords, coords)
    attrs = read_feature_attrs(path)
    assert attrs["format_version"] == 1 and attrs["source_format"] == "slidemil"
    assert attrs["dtype"] == dtype and attrs["feature_dim"] == 24 and attrs["patch_size"] == 256
    assert bag.encoder == "resnet18" and read_feature_file(path).features.dtype == np.float32
    assert is_complete_feature_file(path, "resnet18", rows=37)
    assert not is_complete_feature_file(path, "uni")
    assert not is_complete_feature_file(path, "resnet18", rows=38), "re-patched slide is redone"


def test_streamed_chunks_make_the_same_file(tmp_path):
    features, coords = _bag(1000, 8)
    with FeatureWriter(tmp_path / "s.h5", coords, dim=8, dtype="float32", attrs={}) as out:
        for start in range(0, 1000, 96):
            out.write(features[start : start + 96])
    np.testing.assert_array_equal(read_feature_file(tmp_path / "s.h5").features, features)
    empty = write_feature_file(
        tmp_path / "e.h5", np.zeros((0, 8), np.float16), np.zeros((0, 2)), {}
    )
    assert read_feature_file(empty).features.shape == (0, 8)


def test_an_interrupted_write_leaves_no_file(tmp_path):
    features, coords = _bag()
    with (
        pytest.raises(RuntimeError, match="encoder died"),
        FeatureWriter(tmp_path / "s.h5", coords, dim=24, dtype="float16", attrs={}) as out,
    ):
        out.write(features[:10])
        raise RuntimeError("encoder died")
    with (
        pytest.raises(ValueError, match="10 feature rows written for 37 coords"),
        FeatureWriter(tmp_path / "s.h5", coords, dim=24, dtype="float16", attrs={}) as out,
    ):
        out.write(features[:10])
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_an_artifact_error_naming_it(tmp_path):
    features, coords = _bag()
    path = write_feature_file(tmp_path / "s.h5", features, coords, {"encoder": "resnet18"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    assert not is_complete_feature_file(path)
    with pytest.raises(ArtifactError, match=r"s\.h5: unreadable or truncated"):
        read_feature_file(path)
    with pytest.raises(ArtifactError, match=r"nothing\.h5: feature file not found"):
        read_feature_file(tmp_path / "nothing.h5")


def test_reads_clam_h5_and_pt_features(tmp_path):
    features, coords = _bag(70, 1024)
    h5_path, pt_path = write_clam_features(tmp_path, "s", features, coords, batch_size=32)
    with h5py.File(h5_path, "r") as f:  # what CLAM wrote: no attributes, int32 coords
        assert not f.attrs and not f["features"].attrs and not f["coords"].attrs
        assert f["coords"].dtype == np.int32 and f["features"].chunks == (32, 1024)

    h5 = read_feature_file(h5_path)
    assert h5.attrs["source_format"] == "clam-h5" and h5.attrs["has_coords"]
    np.testing.assert_array_equal(h5.features, features)
    np.testing.assert_array_equal(h5.coords, coords)
    assert h5.coords.dtype == np.int64
    stored = read_feature_file(h5_path, dtype=None)
    assert stored.features.dtype == np.float32  # dtype=None keeps what is stored

    pt = read_feature_file(pt_path)
    assert pt.attrs["source_format"] == "clam-pt" and not pt.attrs["has_coords"]
    np.testing.assert_array_equal(pt.features, features)
    assert pt.coords.shape == (70, 2)


def test_reads_trident_h5_and_pt_features(tmp_path):
    features, _ = _bag(50, 1536)
    coords_dir = trident_coords_dir(tmp_path, 20, 256)
    coords = trident_grid(5120, 2560, 256, 40, 20)
    write_trident_patch_file(coords_dir, "s", coords, patch_size=256, src_mag=40, target_mag=20,
                             width=5120, height=2560)  # fmt: skip
    path = write_trident_features(coords_dir, "s", features, encoder="uni_v2")
    assert path == coords_dir / "features_uni_v2" / "s.h5"
    bag = read_feature_file(path)
    assert bag.attrs["source_format"] == "trident" and bag.encoder == "uni_v2"
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["target_magnification"] == 20
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)

    pt_path = write_trident_features(coords_dir, "s", features, encoder="uni_v2", saveas="pt")
    pt = read_feature_file(pt_path)  # TRIDENT's .pt option saves the NumPy array
    assert pt.attrs["source_format"] == "trident-pt"
    np.testing.assert_array_equal(pt.features, features)


def test_trident_bag_of_a_slide_without_tissue_is_an_empty_bag(tmp_path):
    # TRIDENT saves features np.empty((0,)) when the encoder does not say its width
    coords_dir = trident_coords_dir(tmp_path, 20, 256)
    write_trident_patch_file(coords_dir, "s", np.empty((0, 2)), patch_size=256, src_mag=40,
                             target_mag=20, width=5120, height=2560)  # fmt: skip
    path = write_trident_features(coords_dir, "s", np.empty((0,), np.float32), encoder="x")
    bag = read_feature_file(path)
    assert len(bag) == 0 and bag.coords.shape == (0, 2)
    assert probe_feature_file("s", path) == "no instances (empty bag)"  # left out of training


def test_foreign_file_that_is_not_features_is_refused(tmp_path):
    with h5py.File(tmp_path / "patches.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    with pytest.raises(ArtifactError, match="no 'features' dataset"):
        read_feature_file(tmp_path / "patches.h5")
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(ArtifactError, match=r"dict\.pt: expected a tensor"):
        read_feature_file(tmp_path / "dict.pt")


def test_views_round_trip_next_to_unchanged_features(tmp_path):
    from slidemil.formats.feature_file import count_views, read_views

    features, coords = _bag(300, 16)
    views = RNG.normal(size=(3, 300, 16)).astype(np.float32)
    record = {"views": 3, "ops": ["flip"], "strengths": {}, "seed": 0}
    attrs = {"encoder": "resnet18", "augmentation": record}
    with FeatureWriter(
        tmp_path / "s.h5", coords, dim=16, dtype="float16", attrs=attrs, views=3
    ) as out:
        for start in range(0, 300, 128):  # streamed in chunks, as extraction writes
            out.write(features[start : start + 128], views[:, start : start + 128])
    path = tmp_path / "s.h5"
    np.testing.assert_allclose(read_feature_file(path).features, features, atol=2e-3)
    np.testing.assert_allclose(read_views(path), views, atol=2e-3)
    np.testing.assert_allclose(read_views(path, view=2), views[2], atol=2e-3)
    assert read_views(path, dtype=None).dtype == np.float16 and count_views(path) == 3
    stored = read_feature_attrs(path)
    assert stored["n_views"] == 3 and stored["augmentation"] == record
    assert is_complete_feature_file(path, attrs={"n_views": 3, "augmentation": record})
    assert not is_complete_feature_file(path, attrs={"n_views": 4, "augmentation": record})
    other = {**record, "seed": 1}
    assert not is_complete_feature_file(path, attrs={"n_views": 3, "augmentation": other})
    with pytest.raises(ArtifactError, match=r"s\.h5: has 3 views, no view 3"):
        read_views(path, view=3)

    plain = write_feature_file(tmp_path / "p.h5", features, coords, {"encoder": "resnet18"})
    assert read_views(plain).shape == (0, 300, 16) and count_views(plain) == 0
    assert read_feature_attrs(plain)["n_views"] == 0
    assert is_complete_feature_file(plain, attrs={"n_views": 0, "augmentation": None})
    assert not is_complete_feature_file(plain, attrs={"n_views": 3, "augmentation": record})
    with pytest.raises(ArtifactError, match=r"p\.h5: has no views, no view 0"):
        read_views(plain, view=0)
    with h5py.File(plain, "a") as f:  # a file from before views: no n_views attribute
        del f.attrs["n_views"]
    assert count_views(plain) == 0 and is_complete_feature_file(plain, attrs={"n_views": 0})


def test_views_that_do_not_match_the_features_are_refused(tmp_path):
    from slidemil.formats.feature_file import count_views, read_views

    features, coords = _bag(20, 8)
    path = write_feature_file(
        tmp_path / "s.h5", features, coords, {"encoder": "resnet18"},
        views=np.zeros((2, 20, 8), np.float32),
    )  # fmt: skip
    with h5py.File(path, "a") as f:
        del f["views"]
        f["views"] = np.zeros((2, 19, 8), np.float32)  # a row short
    with pytest.raises(ArtifactError, match=r"s\.h5: 'views' \(2, 19, 8\) does not match"):
        read_views(path)
    assert not is_complete_feature_file(path, attrs={"n_views": 2})
    with h5py.File(path, "a") as f:
        del f["views"]
    with pytest.raises(ArtifactError, match="records n_views=2 but has no 'views' dataset"):
        count_views(path)
    writer = FeatureWriter(tmp_path / "w.h5", coords, dim=8, dtype="float32", attrs={}, views=2)
    with (
        pytest.raises(ValueError, match=r"view chunk \(1, 20, 8\) must be \(2, 20, 8\)"),
        writer as out,
    ):
        out.write(features, np.zeros((1, 20, 8)))
    assert not (tmp_path / "w.h5").exists()


def test_clam_files_have_no_views(tmp_path):
    from slidemil.formats.feature_file import count_views, read_views

    features, coords = _bag(70, 32)
    h5_path, pt_path = write_clam_features(tmp_path, "s", features, coords, batch_size=32)
    for path in (h5_path, pt_path):
        assert count_views(path) == 0 and read_views(path).shape == (0, 70, 32)
