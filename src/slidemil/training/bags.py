"""Bags of patch features for training: probing files, the dataset, padding and standardisation.

A bag is read from its HDF5 feature file on every access, or held in RAM (``cache``). In training
at most ``max_patches`` instances are drawn per bag, afresh each epoch but reproducibly from
``(seed, epoch, bag)``, so a resumed run sees the same draws as an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagInfo:
    """A feature file that opened: its slide, path, instance count N, feature size D and bytes."""

    slide_id: str
    path: Path
    n_instances: int
    dim: int
    nbytes: int


def probe_feature_file(slide_id: str, path: Path) -> BagInfo | str:
    """The file's shape without reading the features, or why it cannot be used."""
    if not path.is_file():
        return "feature file missing"
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                return "no 'features' dataset"
            shape = f["features"].shape
            itemsize = f["features"].dtype.itemsize
    except (OSError, KeyError, ValueError) as e:
        return f"unreadable: {e}".replace("\n", " ")
    if len(shape) != 2:
        return f"'features' is not 2-D: {shape}"
    if shape[0] == 0:
        return "no instances (empty bag)"
    if shape[1] == 0:
        return "no feature columns (D = 0)"
    return BagInfo(
        slide_id, path, int(shape[0]), int(shape[1]), int(shape[0] * shape[1] * itemsize)
    )


def read_bag(path: Path) -> np.ndarray:
    """All features of a bag, (N, D), in the stored dtype."""
    with h5py.File(path, "r") as f:
        return f["features"][:]


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


def fit_standardizer(bags: list[np.ndarray] | list[Path]) -> Standardizer:
    """Mean and std over every instance of ``bags`` (arrays or feature files), in float64."""
    total = None
    total_sq = None
    count = 0
    for bag in bags:
        values = (read_bag(bag) if isinstance(bag, Path) else bag).astype(np.float64)
        total = values.sum(0) if total is None else total + values.sum(0)
        total_sq = (values**2).sum(0) if total_sq is None else total_sq + (values**2).sum(0)
        count += values.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    # constant features would divide by zero; leave them centred but unscaled
    std = np.where(var > 1e-12, np.sqrt(var), 1.0)
    return Standardizer(mean.astype(np.float32), std.astype(np.float32))


class BagDataset(Dataset):
    """Item ``i`` -> ``(features (n, D) float32, label index, i)``.

    Args:
        bags: the bags' files.
        labels: class index per bag.
        max_patches: instances drawn per bag when ``sample`` (None: all).
        sample: draw instances (training) or return all of them (validation, test).
        cache: slide id -> features in RAM; None reads the file on every access.
        standardizer: applied to every bag when given.
        seed: with the epoch (``set_epoch``) and the index, fixes the draws.
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
    ):
        self.bags = bags
        self.labels = labels
        self.max_patches = max_patches
        self.sample = sample
        self.cache = cache
        self.standardizer = standardizer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        info = self.bags[index]
        features = self.cache[info.slide_id] if self.cache is not None else read_bag(info.path)
        if self.sample and self.max_patches is not None and len(features) > self.max_patches:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            chosen = np.sort(rng.choice(len(features), self.max_patches, replace=False))
            features = features[chosen]
        # torch converts float16 about ten times faster than numpy; copy=True leaves a cached
        # float32 bag intact under the in-place standardisation
        bag = torch.from_numpy(np.ascontiguousarray(features)).to(torch.float32, copy=True)
        if self.standardizer is not None:
            self.standardizer.apply_(bag)
        return bag, self.labels[index], index


def load_cache(bags: list[BagInfo]) -> dict[str, np.ndarray]:
    """Every bag in RAM, in its stored dtype (float16 files stay half the size)."""
    return {info.slide_id: read_bag(info.path) for info in bags}


def pad_bags(
    items: list[tuple[torch.Tensor, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate bags of different sizes: features (B, N_max, D) zero-padded, mask (B, N_max) bool
    (True on real instances), labels (B,) and dataset indices (B,)."""
    if len(items) == 1:  # one bag (inference, batch size 1): nothing to pad, nothing to copy
        features = items[0][0][None]
        mask = torch.ones(features.shape[:2], dtype=torch.bool)
    else:
        longest = max(features.shape[0] for features, _, _ in items)
        dim = items[0][0].shape[1]
        features = torch.zeros(len(items), longest, dim)
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, (bag, _, _) in enumerate(items):
            features[row, : len(bag)] = bag
            mask[row, : len(bag)] = True
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    indices = torch.tensor([index for _, _, index in items], dtype=torch.long)
    return features, mask, labels, indices
