"""Checkpoints: self-describing dicts that rebuild their model and resume their run exactly.

Keys: ``format_version, model_name, model_kwargs, model_state, optimizer_state, scheduler_state,
scaler_state, rng_state, epoch, best_metric, best_epoch, epochs_without_improvement,
best_val_loss, recent_monitored (the raw monitored values of the last ``smoothing - 1`` epochs),
monitor, config, class_names, encoder, feature_dim, standardization
({"mean", "std"} tensors or None), class_weights (per-class loss weights or None), split
({"train", "val", "test"} slide id lists), fold, world_size (processes that trained it; a resume
with another count is refused), slidemil_version``. Everything is a tensor or
plain Python value, so ``torch.load(..., weights_only=True)`` reads it.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slidemil.atomic import atomic_path
from slidemil.errors import ArtifactError
from slidemil.models import build_model

CHECKPOINT_FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a killed save leaves the previous checkpoint intact)."""
    with atomic_path(path) as tmp:
        torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **state}, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ArtifactError(path, f"unreadable or truncated checkpoint: {e}") from e
    if not isinstance(state, dict) or "model_state" not in state:
        raise ArtifactError(path, "not a slidemil checkpoint (no model_state)")
    return state


def load_model_from_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model (in eval mode) and its checkpoint dict, with no other arguments needed."""
    state = load_checkpoint(path, map_location)
    model = build_model(
        state["model_name"],
        in_dim=int(state["feature_dim"]),
        n_classes=len(state["class_names"]),
        **state["model_kwargs"],
    )
    model.load_state_dict(state["model_state"])
    return model.to(map_location).eval(), state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and (current) CUDA generator states as checkpoint-safe values."""
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        # the current GPU only: reading every GPU's state would open a CUDA context on each
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0].cpu())  # the current GPU
