"""Multi-process training under ``torchrun``: process group setup and metric reduction.

``torchrun --nproc_per_node N -m slidemil train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; each process then trains on a disjoint share of the training bags (NCCL on GPU,
gloo on CPU), every process evaluates the full validation set (so all ranks agree on early
stopping), and only rank 0 writes files. Without those variables this is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from slidemil.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(None, f"device {name!r} requested but CUDA is not available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, resolved)


def teardown_distributed(context: DistContext) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if context.distributed:
        dist.barrier()


def mean_over_ranks(value: float, weight: float, context: DistContext) -> float:
    """The ``weight``-weighted mean of ``value`` over all ranks (e.g. loss per bag)."""
    if not context.distributed:
        return value
    backend_device = context.device if context.device.type == "cuda" else torch.device("cpu")
    pair = torch.tensor([value * weight, weight], dtype=torch.float64, device=backend_device)
    dist.all_reduce(pair)
    return float(pair[0] / pair[1].clamp_min(1e-12))


def broadcast_object(obj, context: DistContext):
    """Rank 0's ``obj`` on every rank."""
    if not context.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
