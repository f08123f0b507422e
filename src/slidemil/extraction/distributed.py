"""Multi-GPU extraction under ``torchrun``: each rank takes a disjoint shard of slides.

No process group is needed: ranks never exchange tensors, they only split the cohort, so
``torchrun --nproc-per-node 4 -m slidemil extract ...`` (or four SLURM tasks) just works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from slidemil.runner import Shard


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a torchrun launch (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> RankInfo:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


def rank_shard(shard: Shard, ranks: RankInfo) -> Shard:
    """Combine a ``--shard i/n`` (e.g. a SLURM array task) with the torchrun rank.

    Slides ``items[i::n]`` are split again over the ranks; ``items[i::n][r::w]`` equals
    ``items[i + n*r :: n*w]``, so the result is one :class:`Shard` and the union over all array
    tasks and ranks covers every slide exactly once.
    """
    return Shard(shard.index + shard.count * ranks.rank, shard.count * ranks.world_size)
