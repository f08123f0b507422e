"""The order of the training bags in an epoch: shuffled once each, or class-balanced.

Both samplers give each rank of a torchrun job a disjoint share of one order per epoch, equal in
length on every rank (DDP needs the same number of steps), and depend only on their seed keys and
the epoch, so a resumed run draws the same bags as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset, DistributedSampler, Sampler

from slidemil.training.config import TrainConfig


class BalancedClassSampler(Sampler[int]):
    """Each epoch, ``len(labels)`` bags drawn with replacement, a bag of class k with probability
    ∝ 1 / count(k), so every class is drawn equally often on average (CLAM's weighted sampling).

    The order is drawn once per epoch from ``(*seed_keys, epoch)``, the same on every rank; it is
    lengthened to a multiple of ``num_replicas`` by further draws, and rank r takes every
    ``num_replicas``-th bag from position r.

    Args:
        labels: class index of every bag of the dataset.
        num_replicas: processes sharing the epoch (torchrun's world size).
        rank: this process.
        seed_keys: integers that, with the epoch, fix the draws (e.g. seed and fold).
    """

    def __init__(
        self,
        labels: Sequence[int],
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed_keys: Sequence[int] = (0,),
    ):
        if not labels:
            raise ValueError("a balanced sampler needs at least one bag")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed_keys = [int(k) for k in seed_keys]
        self.epoch = 0
        counts = np.bincount(self.labels)
        weights = 1.0 / counts[self.labels]
        self.probabilities = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([*self.seed_keys, self.epoch])
        total = len(self) * self.num_replicas
        order = rng.choice(len(self.labels), size=total, replace=True, p=self.probabilities)
        return iter(order[self.rank :: self.num_replicas].tolist())


def training_sampler(
    dataset: Dataset,
    labels: Sequence[int],
    config: TrainConfig,
    fold: int,
    *,
    world_size: int,
    rank: int,
) -> DistributedSampler | BalancedClassSampler:
    """The sampler ``config.sampler`` names, for the training bags of ``fold``.

    ``shuffle``: a ``DistributedSampler`` over one shuffled order per epoch (every bag once; a few
    repeated so that every rank gets the same number). ``balanced``: :class:`BalancedClassSampler`.
    """
    if config.sampler == "balanced":
        return BalancedClassSampler(
            labels, num_replicas=world_size, rank=rank, seed_keys=(config.seed, fold)
        )
    return DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.seed + fold
    )
