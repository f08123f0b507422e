"""Multi-process training under ``torchrun``: process group, rank-0 decisions and reductions.

``torchrun --nproc_per_node N -m slidemil train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; each process then trains on a disjoint share of the training bags (NCCL on GPU,
gloo on CPU) and predicts a disjoint share of the validation and test bags, whose predictions are
gathered so every rank computes the same metrics and takes the same early-stopping decision.
Only rank 0 reads and writes the run folder; what it reads (or the error it hit) reaches every
rank through :func:`on_main`, so a failure there stops all ranks instead of leaving them waiting.
Without those variables this is a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from slidemil.devices import resolve_device
from slidemil.errors import SlidemilError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, its device, and whether this code
    created the process group (and so destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    resolved = resolve_device(device, local_rank, world_size)
    if resolved.type == "cuda":
        # before any collective: NCCL and broadcast_object_list use the current device
        torch.cuda.set_device(resolved)
    owns = not dist.is_initialized()
    if owns:
        if resolved.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=resolved)
        else:
            dist.init_process_group(backend="gloo")
    return DistContext(rank, world_size, local_rank, resolved, owns)


def teardown_distributed(context: DistContext, *, finished: bool = False) -> None:
    """Destroy the process group this code created (a caller's own group is left alone).

    ``finished``: every rank got here without an error, so all meet in a barrier first and none
    tears its group down while another still has work in flight on it (after an error a barrier
    could wait for a rank that is gone, so there is none).
    """
    if not (context.owns_group and dist.is_initialized()):
        return
    if finished and context.distributed:
        dist.barrier()
    dist.destroy_process_group()


def mean_over_ranks(value: float, weight: float, context: DistContext) -> float:
    """The ``weight``-weighted mean of ``value`` over all ranks (e.g. loss per bag)."""
    if not context.distributed:
        return value
    # NCCL reduces device tensors only; gloo reduces CPU tensors
    pair = torch.tensor([value * weight, weight], dtype=torch.float64, device=context.device)
    dist.all_reduce(pair)
    return float(pair[0] / pair[1].clamp_min(1e-12))


def broadcast_object(obj: T, context: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; tensors should be on the CPU)."""
    if not context.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main(context: DistContext, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only; every rank returns its result or raises its error.

    Use it for everything that touches the run folder, so that the ranks never disagree on what
    is on disk and an error on rank 0 (a changed option, a full disk) stops all of them.
    """
    if not context.distributed:
        return action()
    outcome: tuple[bool, Any] | None = None
    if context.is_main:
        try:
            outcome = (True, action())
        except SlidemilError as e:
            outcome = (False, e)
        except BaseException:
            broadcast_object((False, None), context)
            raise
    ok, value = broadcast_object(outcome, context)
    if ok:
        return value
    if value is None:
        raise RuntimeError("rank 0 failed; its traceback is in the log of rank 0")
    raise value


def gather_predictions(
    probabilities: np.ndarray, indices: np.ndarray, context: DistContext
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``(probabilities (n, C), dataset indices (n,))`` joined on every rank, sorted by
    index, each index once (a DistributedSampler repeats a few bags to even out the shares)."""
    if context.distributed:
        shares: list[Any] = [None] * context.world_size
        dist.all_gather_object(shares, (probabilities, indices))
        probabilities = np.concatenate([p for p, _ in shares])
        indices = np.concatenate([i for _, i in shares])
    indices, first = np.unique(indices, return_index=True)
    return probabilities[first], indices
