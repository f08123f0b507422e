"""Bags of patch features for training: probing files, the dataset, padding and standardisation.

A bag is read from its feature file on every access, or held in RAM (``cache``): slidemil's,
CLAM's and TRIDENT's HDF5 files and CLAM's (or TRIDENT's) ``.pt`` bags alike. In training
at most ``max_patches`` instances are drawn per bag, afresh each epoch but reproducibly from
``(seed, epoch, bag)``, so a resumed run sees the same draws as an uninterrupted one. A
training bag may then be augmented (:mod:`slidemil.training.augment`: augmented views, instance
dropout, feature noise); validation and test bags never are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from slidemil.errors import ArtifactError
from slidemil.formats.feature_file import count_views
from slidemil.formats.foreign_features import pt_feature_shape, read_pt_features
from slidemil.training.augment import AUGMENT_STREAM, BagAugmentation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagInfo:
    """A feature file that opened: its slide, path, instance count N, feature size D and bytes
    of ``/features``; K augmented views in ``/views`` (K, N, D) and their bytes (0 when none, with
    ``views_problem`` saying why when a ``/views`` dataset is there but unusable)."""

    slide_id: str
    path: Path
    n_instances: int
    dim: int
    nbytes: int
    n_views: int = 0
    views_nbytes: int = 0
    views_problem: str | None = None


def probe_feature_file(slide_id: str, path: Path) -> BagInfo | str:
    """The file's shape without reading the features, or why it cannot be used (``.h5`` of
    slidemil, CLAM or TRIDENT; ``.pt`` of CLAM or TRIDENT)."""
    if not path.is_file():
        return "feature file missing"
    views_itemsize = 0
    if path.suffix == ".pt":
        try:
            shape, itemsize = pt_feature_shape(path)
        except ArtifactError as e:
            return e.problem.replace("\n", " ")
    else:
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    return "no 'features' dataset"
                shape = f["features"].shape
                itemsize = f["features"].dtype.itemsize
                if isinstance(f.get("views"), h5py.Dataset):
                    views_itemsize = f["views"].dtype.itemsize
        except (OSError, KeyError, ValueError) as e:
            return f"unreadable: {e}".replace("\n", " ")
    if tuple(shape) == (0,):  # TRIDENT's bag of a slide without tissue: width unknown
        return "no instances (empty bag)"
    if len(shape) != 2:
        return f"'features' is not 2-D: {shape}"
    if shape[0] == 0:
        return "no instances (empty bag)"
    if shape[1] == 0:
        return "no feature columns (D = 0)"
    n, dim = int(shape[0]), int(shape[1])
    n_views, views_problem = 0, None
    if views_itemsize:  # a /views dataset: checked against /features and n_views
        try:
            n_views = count_views(path)
        except ArtifactError as e:
            views_problem = e.problem.replace("\n", " ")
    return BagInfo(
        slide_id, path, n, dim, n * dim * itemsize,
        n_views=n_views, views_nbytes=n_views * n * dim * views_itemsize,
        views_problem=views_problem,
    )  # fmt: skip


def read_bag(path: Path) -> np.ndarray:
    """All features of a bag, (N, D), in the stored dtype."""
    if path.suffix == ".pt":
        return read_pt_features(path)
    with h5py.File(path, "r") as f:
        return f["features"][:]


def read_bag_coords(path: Path, n_instances: int) -> np.ndarray | None:
    """The bag's level-0 patch x, y (N, 2) int64 from an HDF5 file's ``/coords`` (slidemil,
    CLAM, TRIDENT), or None where it has none that fits (``.pt`` bags, a missing dataset, a
    shape other than (N, 2))."""
    if path.suffix == ".pt":
        return None
    with h5py.File(path, "r") as f:
        stored = f.get("coords")
        if not isinstance(stored, h5py.Dataset) or stored.shape != (n_instances, 2):
            return None
        return np.asarray(stored[:], dtype=np.int64)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and std (D,), fitted on the training bags only."""

    mean: np.ndarray
    std: np.ndarray

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std

    def apply_(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`apply` in place on a float32 tensor (N, D) (the same values, no copies)."""
        return features.sub_(torch.from_numpy(self.mean)).div_(torch.from_numpy(self.std))

    def to_state(self) -> dict[str, torch.Tensor]:
        return {"mean": torch.from_numpy(self.mean), "std": torch.from_numpy(self.std)}

    @classmethod
    def from_state(cls, state: dict | None) -> Standardizer | None:
        if state is None:
            return None
        return cls(np.asarray(state["mean"], np.float32), np.asarray(state["std"], np.float32))


# Rows per chunk of a bag while fitting: about 4 MiB of float64 whatever D is.
_FIT_CHUNK_BYTES = 4 * 2**20


def fit_standardizer(bags: Iterable[np.ndarray | Path]) -> Standardizer:
    """Mean and population std (D,) over every instance of ``bags`` (arrays in RAM or feature
    files), in float64 but a chunk of rows at a time: memory stays at a few MiB whatever the bag
    sizes, and float16/float32 inputs neither overflow nor lose precision.

    Chunks are merged with Chan et al.'s pairwise update of count, mean and sum of squared
    deviations, which, unlike ``E[x²] - E[x]²``, stays exact for features whose mean is large
    against their spread.
    """
    count = 0
    mean: np.ndarray | None = None
    squares: np.ndarray | None = None  # sum of squared deviations from the mean
    for bag in bags:
        for chunk in _row_chunks(bag):
            values = chunk.astype(np.float64)
            n = values.shape[0]
            if n == 0:
                continue
            chunk_mean = values.mean(0)
            chunk_squares = ((values - chunk_mean) ** 2).sum(0)
            if mean is None or squares is None:
                count, mean, squares = n, chunk_mean, chunk_squares
                continue
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            squares = squares + chunk_squares + delta**2 * (count * n / total)
            count = total
    if mean is None or squares is None:
        raise ValueError("cannot fit a standardiser on no instances")
    var = squares / count
    # constant features would divide by zero; leave them centred but unscaled
    std = np.where(var > 1e-12, np.sqrt(var), 1.0)
    return Standardizer(mean.astype(np.float32), std.astype(np.float32))


def _row_chunks(bag: np.ndarray | Path) -> Iterator[np.ndarray]:
    """A bag's features (N, D), a block of rows at a time; an HDF5 file is read block by block."""
    if isinstance(bag, Path) and h5py.is_hdf5(bag):
        with h5py.File(bag, "r") as f:
            features = f["features"]
            batched = features.ndim == 3 and features.shape[0] == 1  # (1, N, D), as read_bag
            n, dim = features.shape[-2:]
            rows = max(1, _FIT_CHUNK_BYTES // (8 * max(1, dim)))
            for start in range(0, n, rows):
                block = slice(start, start + rows)
                yield features[0, block] if batched else features[block]
        return
    values = read_bag(bag) if isinstance(bag, Path) else bag
    rows = max(1, _FIT_CHUNK_BYTES // (8 * max(1, values.shape[1])))
    for start in range(0, values.shape[0], rows):
        yield values[start : start + rows]


class BagDataset(Dataset):
    """Item ``i`` -> ``(features (n, D) float32, label index, i, coords (n, 2) float32 | None)``:
    the coords (level-0 x, y of the same n rows) are None for a bag without them
    (:func:`read_bag_coords`); with a ``cache`` they are read once and kept beside the bags.

    Args:
        bags: the bags' files.
        labels: class index per bag.
        max_patches: instances drawn per bag when ``sample`` (None: all).
        sample: draw instances (training) or return all of them (validation, test).
        cache: slide id -> features in RAM; None reads the file on every access.
        standardizer: applied to every bag when given.
        seed: with the epoch (``set_epoch``) and the index, fixes the draws.
        augment: applied to training bags (``sample``) only, after ``max_patches`` sampling;
            feature noise after the standardisation.
    """

    def __init__(
        self,
        bags: list[BagInfo],
        labels: list[int],
        *,
        max_patches: int | None = None,
        sample: bool = False,
        cache: dict[str, np.ndarray] | None = None,
        standardizer: Standardizer | None = None,
        seed: int = 0,
        augment: BagAugmentation | None = None,
    ):
        self.bags = bags
        self.labels = labels
        self.max_patches = max_patches
        self.sample = sample
        self.cache = cache
        self.standardizer = standardizer
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        # with cached bags, a file is never reopened: its coords (16 bytes a patch) stay in RAM
        self._coords: dict[str, np.ndarray | None] | None = {} if cache is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
        info = self.bags[index]
        features = self.cache[info.slide_id] if self.cache is not None else read_bag(info.path)
        rows = None
        if self.sample and self.max_patches is not None and len(features) > self.max_patches:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            rows = np.sort(rng.choice(len(features), self.max_patches, replace=False))
        augment = self.augment if self.sample else None
        if augment is not None:
            augment_rng = np.random.default_rng((self.seed, self.epoch, index, AUGMENT_STREAM))
            features, rows = augment.draw_instances(info, features, rows, augment_rng)
        elif rows is not None:
            features = features[rows]
        coords = self._bag_coords(info)
        if coords is not None:
            coords = torch.from_numpy(coords if rows is None else coords[rows]).float()
        # torch converts float16 about ten times faster than numpy; copy=True leaves a cached
        # float32 bag intact under the in-place standardisation
        bag = torch.from_numpy(np.ascontiguousarray(features)).to(torch.float32, copy=True)
        if self.standardizer is not None:
            self.standardizer.apply_(bag)
        if augment is not None:
            augment.add_noise_(bag, augment_rng)
        return bag, self.labels[index], index, coords

    def _bag_coords(self, info: BagInfo) -> np.ndarray | None:
        if self._coords is None:
            return read_bag_coords(info.path, info.n_instances)
        if info.slide_id not in self._coords:
            self._coords[info.slide_id] = read_bag_coords(info.path, info.n_instances)
        return self._coords[info.slide_id]


def load_cache(bags: list[BagInfo]) -> dict[str, np.ndarray]:
    """Every bag in RAM, in its stored dtype (float16 files stay half the size)."""
    return {info.slide_id: read_bag(info.path) for info in bags}


def pad_bags(
    items: list[tuple[torch.Tensor, int, int, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Collate bags of different sizes: features (B, N_max, D) zero-padded, mask (B, N_max) bool
    (True on real instances), labels (B,), dataset indices (B,) and coords (B, N_max, 2) float32
    zero-padded, or None when a bag of the batch has none (then no bag of it gets any)."""
    with_coords = all(item[3] is not None for item in items)
    if len(items) == 1:  # one bag (inference, batch size 1): nothing to pad, nothing to copy
        features = items[0][0][None]
        mask = torch.ones(features.shape[:2], dtype=torch.bool)
        coords = items[0][3][None] if with_coords else None
    else:
        longest = max(item[0].shape[0] for item in items)
        dim = items[0][0].shape[1]
        features = torch.zeros(len(items), longest, dim)
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        coords = torch.zeros(len(items), longest, 2) if with_coords else None
        for row, (bag, _, _, bag_coords) in enumerate(items):
            features[row, : len(bag)] = bag
            mask[row, : len(bag)] = True
            if coords is not None:
                coords[row, : len(bag)] = bag_coords
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    indices = torch.tensor([item[2] for item in items], dtype=torch.long)
    return features, mask, labels, indices, coords
