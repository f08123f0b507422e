"""Wrapping a model in DistributedDataParallel, with unused-parameter detection probed on the
model's own training forward pass (label-aware for models with ``uses_labels``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slidemil.models.registry import coords_keywords
from slidemil.training.distributed import DistContext
from slidemil.training.loop import model_uses_labels

PROBE_SIZES = (16, 1)  # instances per probe bag


def wrap_ddp(
    core: nn.Module, context: DistContext, in_dim: int, n_classes: int
) -> DistributedDataParallel:
    """DDP around ``core``; ``find_unused_parameters`` only for a model that needs it (it costs a
    graph traversal every step, and without it such a model stops DDP with an error).

    The probe runs as training does, one random bag alone in its batch, for every label (a
    label-aware model such as CLAM may use an instance classifier for one label and not for
    another) and at two sizes (a one-instance bag may give a clustering loss nothing to select).
    """
    device = context.device
    uses_labels = model_uses_labels(core)
    noise = torch.Generator().manual_seed(0)
    core.train()
    unused = False
    for n in PROBE_SIZES:
        features = torch.randn(1, n, in_dim, generator=noise).to(device)
        mask = torch.ones(1, n, dtype=torch.bool, device=device)
        # a row of grid patches, for a model that lays its instances out by them
        grid = torch.arange(n, dtype=torch.float32, device=device) * 256
        extra = coords_keywords(core, torch.stack([grid, torch.zeros_like(grid)], dim=1)[None])
        for label in range(n_classes if uses_labels else 1):
            if uses_labels:
                labels = torch.tensor([label], device=device)
                logits, _, auxiliary = core(features, mask, labels=labels, **extra)
                objective = logits.float().sum() + auxiliary.float()
            else:
                objective = core(features, mask, **extra)[0].float().sum()
            objective.backward()
            unused = unused or any(p.requires_grad and p.grad is None for p in core.parameters())
            core.zero_grad(set_to_none=True)
    return DistributedDataParallel(
        core,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=unused,
    )
