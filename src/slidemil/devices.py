"""The one rule that turns a ``--device`` option into a torch device, for every stage.

``auto`` is this process's GPU when CUDA is available, else the CPU; ``cuda`` is the GPU of this
rank (``cuda:LOCAL_RANK`` under torchrun, ``cuda:0`` alone); ``cuda:N`` and ``cpu`` stay as given.
Asking for a GPU that is not there, or putting every torchrun rank on one GPU, is a
:class:`~slidemil.errors.ConfigError` with the fix, never a silent fall back to the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slidemil.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of option value ``name`` for the process of ``local_rank`` on its node among
    ``world_size`` processes in all."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            None,
            f"device {name!r} asked for but no CUDA GPU is visible",
            "use --device cpu or auto, or run where a GPU is (check CUDA_VISIBLE_DEVICES)",
        )
    if name != "cuda":
        if world_size > 1 and name.startswith("cuda:"):
            # every rank would share one GPU: NCCL refuses, and the ranks would compete for it
            raise ConfigError(
                None,
                f"device {name!r} under torchrun puts every rank on one GPU",
                "use --device cuda (each rank takes cuda:LOCAL_RANK), or CUDA_VISIBLE_DEVICES",
            )
        return torch.device(name)
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            None,
            f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible",
            "start at most one process per GPU (torchrun --nproc_per_node)",
        )
    return torch.device("cuda", local_rank)
