"""Patch and feature files written exactly as CLAM and TRIDENT write them.

Every test of reading another tool's files uses these writers, so the tests see the real layouts:
the dtypes, the attribute names and where they sit (on the ``coords`` or ``features`` dataset,
never the file root), the chunking and resizable shapes, the folder names and the patch order.
Each writer names the function of the tool's source it follows, read at mahmoodlab/CLAM
53e2409 (2025-04-14) and mahmoodlab/TRIDENT a91fa84 (2026-06-24).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

# --- CLAM -----------------------------------------------------------------------------------------


def clam_grid(
    boxes: list[tuple[int, int, int, int]], patch_size: int, level_downsample: float, step: int
) -> list[np.ndarray]:
    """Patch origins per tissue contour as CLAM's ``WholeSlideImage.process_contour`` makes
    them (``use_padding=True``): from each contour's bounding box ``(x, y, w, h)`` in level-0 px,
    a grid of ``step * int(downsample)`` level-0 px anchored at the box's corner (not at 0),
    ``np.meshgrid(x_range, y_range, indexing="ij")`` flattened: x outer, y inner. (CLAM then
    drops the candidates outside the contour; callers filter the same way if they want.)"""
    step0 = step * int(level_downsample)
    grids = []
    for x, y, w, h in boxes:
        xs, ys = np.meshgrid(
            np.arange(x, x + w, step=step0), np.arange(y, y + h, step=step0), indexing="ij"
        )
        grids.append(np.array([xs.flatten(), ys.flatten()]).transpose())
    return grids


def write_clam_patch_file(
    save_dir: Path,
    name: str,
    contour_coords: list[np.ndarray],
    *,
    patch_size: int,
    patch_level: int,
    level_downsample: tuple[float, float],
    level_dim: tuple[int, int],
) -> Path:
    """``create_patches_fp.py --save_dir SAVE_DIR``: ``SAVE_DIR/patches/<name>.h5``.

    Follows ``WholeSlideImage.process_contours`` with ``wsi_core.wsi_utils.save_hdf5``: the first
    contour's coords create a resizable int64 dataset (``chunks=(1, 2)``,
    ``maxshape=(None, 2)``) carrying the attributes, each later contour is appended. The
    attributes are those of ``process_contour``: ``level_dim`` and ``downsampled_level_dim``
    are the read level's size (``wsi.level_dimensions[patch_level]``), ``downsample`` its
    (x, y) downsample.
    """
    patch_dir = save_dir / "patches"
    patch_dir.mkdir(parents=True, exist_ok=True)
    path = patch_dir / f"{name}.h5"
    attrs = {
        "patch_size": patch_size,
        "patch_level": patch_level,
        "downsample": tuple(level_downsample),
        "downsampled_level_dim": tuple(np.array(level_dim)),
        "level_dim": tuple(level_dim),
        "name": name,
        "save_path": str(patch_dir),
    }
    first = True
    for coords in contour_coords:
        if len(coords) == 0:  # process_contour returns {} for a contour without patches
            continue
        _clam_save_hdf5(path, {"coords": coords}, {"coords": attrs} if first else None,
                        mode="w" if first else "a", chunk_size=1)  # fmt: skip
        first = False
    return path


def write_clam_features(
    feat_dir: Path, name: str, features: np.ndarray, coords: np.ndarray, batch_size: int = 256
) -> tuple[Path, Path]:
    """``extract_features_fp.py --feat_dir FEAT_DIR``: ``h5_files/<name>.h5`` and
    ``pt_files/<name>.pt``.

    Follows ``compute_w_loader`` with ``utils.file_utils.save_hdf5`` (``chunk_size=32``): one
    call per batch of the DataLoader, ``mode="w"`` then ``"a"``, ``features`` float32 (N, D) and
    ``coords`` int32 (N, 2) (``data['coord'].numpy().astype(np.int32)``) in the patch file's
    order, and no attributes at all; then ``torch.save`` of the features as a float tensor.
    """
    (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    (feat_dir / "pt_files").mkdir(parents=True, exist_ok=True)
    h5_path = feat_dir / "h5_files" / f"{name}.h5"
    mode = "w"
    for start in range(0, len(features), batch_size):
        batch = {
            "features": np.asarray(features[start : start + batch_size], np.float32),
            "coords": np.asarray(coords[start : start + batch_size]).astype(np.int32),
        }
        _clam_save_hdf5(h5_path, batch, None, mode=mode, chunk_size=32)
        mode = "a"
    with h5py.File(h5_path, "r") as f:  # extract_features_fp.py re-reads the file it wrote
        stored = torch.from_numpy(f["features"][:])
    pt_path = feat_dir / "pt_files" / f"{name}.pt"
    torch.save(stored, pt_path)
    return h5_path, pt_path


def _clam_save_hdf5(
    path: Path, assets: dict[str, np.ndarray], attr_dict: dict | None, *, mode: str, chunk_size: int
) -> None:
    """CLAM's ``save_hdf5`` (both copies: ``wsi_core/wsi_utils.py`` with chunks of 1 row for
    patch files, ``utils/file_utils.py`` with ``chunk_size=32`` for features)."""
    with h5py.File(path, mode) as file:
        for key, value in assets.items():
            if key not in file:
                dataset = file.create_dataset(
                    key, shape=value.shape, maxshape=(None, *value.shape[1:]),
                    chunks=(chunk_size, *value.shape[1:]), dtype=value.dtype,
                )  # fmt: skip
                dataset[:] = value
                for attr_key, attr_value in ((attr_dict or {}).get(key) or {}).items():
                    dataset.attrs[attr_key] = attr_value
            else:
                dataset = file[key]
                dataset.resize(len(dataset) + value.shape[0], axis=0)
                dataset[-value.shape[0] :] = value


# --- TRIDENT --------------------------------------------------------------------------------------


def trident_grid(
    width: int, height: int, patch_size: int, src_mag: int, target_mag: int, overlap: int = 0
) -> np.ndarray:
    """Every patch origin of TRIDENT's ``WSIPatcher`` before its tissue filter, in level-0 px:
    ``patch_size_src = round(patch_size * src_mag / target_mag)``, a step of
    ``patch_size_src - overlap_src`` anchored at (0, 0), columns while ``x < width`` and rows
    while ``y < height`` (``_compute_cols_rows``), row-major (y outer, x inner, the default
    ``scan_order``)."""
    downsample = src_mag / target_mag
    step = round(patch_size * downsample) - round(overlap * downsample)
    cols = -(-width // step)
    rows = -(-height // step)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([cc.ravel() * step, rr.ravel() * step], axis=1).astype(np.int64)


def trident_coords_dir(job_dir: Path, target_mag: float, patch_size: int, overlap: int = 0) -> Path:
    """``Processor.run_patching_job``'s folder (``_fmt_mag``):
    ``<job_dir>/<mag>x_<size>px_<overlap>px_overlap``."""
    mag = f"{float(target_mag):g}"  # 10 -> "10", 2.5 -> "2.5", as _fmt_mag writes them
    return job_dir / f"{mag}x_{patch_size}px_{overlap}px_overlap"


def write_trident_patch_file(
    coords_dir: Path,
    name: str,
    coords: np.ndarray,
    *,
    patch_size: int,
    src_mag: int,
    target_mag: int,
    width: int,
    height: int,
    overlap: int = 0,
) -> Path:
    """``WSI.extract_tissue_coords``: ``<coords_dir>/patches/<name>_patches.h5``.

    Follows ``IO.coords_to_h5`` with ``IO.save_h5``: ``coords`` int64 (N, 2), ``chunks=(1, 2)``,
    ``maxshape=(None, 2)``, attributes on ``coords`` only: ``patch_size`` (px at the target
    magnification), ``patch_size_level0 = patch_size * src_mag // target_mag``,
    ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``
    (the coords folder), ``level0_width``, ``level0_height``; ``None`` is saved as ``"None"``.
    """
    (coords_dir / "patches").mkdir(parents=True, exist_ok=True)
    path = coords_dir / "patches" / f"{name}_patches.h5"
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attrs = {
        "patch_size": patch_size,
        "patch_size_level0": patch_size * src_mag // target_mag,
        "level0_magnification": src_mag,
        "target_magnification": target_mag,
        "overlap": overlap,
        "name": name,
        "savetodir": str(coords_dir),
        "level0_width": width,
        "level0_height": height,
    }
    _trident_save_h5(path, {"coords": coords}, {"coords": attrs})
    return path


def write_trident_features(
    coords_dir: Path, name: str, features: np.ndarray, *, encoder: str, saveas: str = "h5"
) -> Path:
    """``WSI.extract_patch_features`` (via ``Processor.run_patch_feature_extraction_job``):
    ``<coords_dir>/features_<encoder>/<name>.h5`` (or ``.pt``).

    The h5 has ``features`` (N, D) with attributes ``name``, ``savetodir``, ``encoder`` and
    ``coords`` (N, 2) with the attributes of the patch file's ``coords`` (``IO.read_coords``),
    both through ``IO.save_h5`` (chunks of one row); ``saveas="pt"`` is ``torch.save`` of the
    NumPy array itself. The rows follow the patch file's coordinates.
    """
    patch_file = coords_dir / "patches" / f"{name}_patches.h5"
    with h5py.File(patch_file, "r") as f:  # IO.read_coords
        coords_attrs = dict(f["coords"].attrs)
        coords = f["coords"][:]
    save_features = coords_dir / f"features_{encoder}"
    save_features.mkdir(parents=True, exist_ok=True)
    path = save_features / f"{name}.{saveas}"
    if saveas == "pt":
        torch.save(np.asarray(features), path)
        return path
    _trident_save_h5(
        path,
        {"features": np.asarray(features), "coords": coords},
        {"features": {"name": name, "savetodir": str(save_features), "encoder": encoder},
         "coords": coords_attrs},
    )  # fmt: skip
    return path


def _trident_save_h5(path: Path, assets: dict[str, np.ndarray], attributes: dict) -> None:
    """TRIDENT's ``IO.save_h5`` with ``mode="w"``: resizable datasets of one-row chunks;
    dict attributes as JSON, ``None`` as the string ``"None"``."""
    import json

    with h5py.File(path, "w") as file:
        for key, value in assets.items():
            dataset = file.create_dataset(
                key, shape=value.shape, maxshape=(None, *value.shape[1:]),
                chunks=(1, *value.shape[1:]), dtype=value.dtype,
            )  # fmt: skip
            dataset[:] = value
            for attr_key, attr_value in (attributes.get(key) or {}).items():
                if isinstance(attr_value, dict):
                    attr_value = json.dumps(attr_value)
                elif attr_value is None:
                    attr_value = "None"
                dataset.attrs[attr_key] = attr_value


def level_geometry(slide_path: Path, level: int) -> dict[str, Any]:
    """What CLAM's ``WholeSlideImage`` knows of a level: its (x, y) downsample (estimated from
    the level sizes when OpenSlide's differs, ``_assertLevelDownsamples``) and its size."""
    import openslide

    with openslide.OpenSlide(str(slide_path)) as wsi:
        dim0 = wsi.level_dimensions[0]
        dim = wsi.level_dimensions[level]
        reported = wsi.level_downsamples[level]
    estimated = (dim0[0] / float(dim[0]), dim0[1] / float(dim[1]))
    downsample = estimated if estimated != (reported, reported) else (reported, reported)
    return {"level_downsample": downsample, "level_dim": tuple(dim)}


def write_legacy_coords_file(
    path: Path, coords: np.ndarray, *, patch_size: int, patch_level: int
) -> Path:
    """The minimal CLAM / Fishing-Rod coords file that TRIDENT's ``IO.read_coords_legacy``
    reads: ``coords`` with only ``patch_size`` and ``patch_level`` (no level downsample)."""
    _clam_save_hdf5(
        path, {"coords": np.asarray(coords, np.int64)},
        {"coords": {"patch_size": patch_size, "patch_level": patch_level}}, mode="w", chunk_size=1,
    )  # fmt: skip
    return path
