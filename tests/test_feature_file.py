"""Feature files: slidemil's own layout written atomically, and CLAM's and TRIDENT's files read
as they are written by those tools (layouts taken from CLAM ``extract_features_fp.py`` /
``utils/file_utils.save_hdf5`` and TRIDENT ``WSI.extract_patch_features`` / ``IO.save_h5``)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from slidemil.errors import ArtifactError
from slidemil.formats.feature_file import (
    FeatureWriter,
    is_complete_feature_file,
    read_feature_attrs,
    read_feature_file,
    write_feature_file,
)

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


def _save_hdf5_like_clam(path, assets: dict[str, np.ndarray]) -> None:
    # CLAM appends batch by batch to resizable datasets chunked by 32 rows, without attributes.
    with h5py.File(path, "w") as f:
        for key, value in assets.items():
            chunks = (32, *value.shape[1:])
            dset = f.create_dataset(
                key, shape=value.shape, maxshape=(None, *value.shape[1:]), chunks=chunks,
                dtype=value.dtype,
            )  # fmt: skip
            dset[:] = value


def test_reads_clam_h5_and_pt_features(tmp_path):
    features, coords = _bag(70, 1024)
    (tmp_path / "h5_files").mkdir()
    (tmp_path / "pt_files").mkdir()
    _save_hdf5_like_clam(tmp_path / "h5_files" / "s.h5", {"features": features, "coords": coords})
    torch.save(torch.from_numpy(features), tmp_path / "pt_files" / "s.pt")

    h5 = read_feature_file(tmp_path / "h5_files" / "s.h5")
    assert h5.attrs["source_format"] == "clam-h5" and h5.attrs["has_coords"]
    np.testing.assert_array_equal(h5.features, features)
    np.testing.assert_array_equal(h5.coords, coords)
    stored = read_feature_file(tmp_path / "h5_files" / "s.h5", dtype=None)
    assert stored.features.dtype == features.dtype  # dtype=None keeps what is stored

    pt = read_feature_file(tmp_path / "pt_files" / "s.pt")
    assert pt.attrs["source_format"] == "clam-pt" and not pt.attrs["has_coords"]
    np.testing.assert_array_equal(pt.features, features)
    assert pt.coords.shape == (70, 2)


def test_reads_trident_h5_and_pt_features(tmp_path):
    features, coords = _bag(50, 1536)
    path = tmp_path / "features_uni_v2" / "s.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:  # TRIDENT: chunks of one row, attributes per dataset
        dset = f.create_dataset("features", data=features, chunks=(1, 1536), maxshape=(None, 1536))
        dset.attrs.update(name="s", savetodir=str(path.parent), encoder="uni_v2")
        dset = f.create_dataset("coords", data=coords, chunks=(1, 2), maxshape=(None, 2))
        dset.attrs.update(
            patch_size=256, patch_size_level0=512, level0_magnification=40,
            target_magnification=20, overlap=0, name="s", savetodir="None",
        )  # fmt: skip
    bag = read_feature_file(path)
    assert bag.attrs["source_format"] == "trident" and bag.encoder == "uni_v2"
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["target_magnification"] == 20
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)

    torch.save(features, tmp_path / "s.pt")  # TRIDENT's .pt option saves the NumPy array
    pt = read_feature_file(tmp_path / "s.pt")
    assert pt.attrs["source_format"] == "trident-pt"
    np.testing.assert_array_equal(pt.features, features)


def test_foreign_file_that_is_not_features_is_refused(tmp_path):
    with h5py.File(tmp_path / "patches.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    with pytest.raises(ArtifactError, match="no 'features' dataset"):
        read_feature_file(tmp_path / "patches.h5")
    torch.save({"not": "a tensor"}, tmp_path / "dict.pt")
    with pytest.raises(ArtifactError, match=r"dict\.pt: expected a tensor"):
        read_feature_file(tmp_path / "dict.pt")
