"""Feature files with augmented views, written as extraction writes them (``/views`` (K, N, D)
next to ``/features``, root attrs ``n_views`` and ``augmentation``), for the training tests.

View v of every instance is its plain features shifted by ``VIEW_SHIFT × v``, so each row of a
drawn training bag says which view it came from (plain values are ~N(0, 1)).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

VIEW_SHIFT = 1000.0


def add_views(path: Path, k: int) -> None:
    """Give the feature file at ``path`` K float32 views: view v = plain + VIEW_SHIFT × v."""
    with h5py.File(path, "r+") as f:
        plain = f["features"][:].astype(np.float32)
        shifts = VIEW_SHIFT * np.arange(1, k + 1, dtype=np.float32)[:, None, None]
        f.create_dataset("views", data=plain[None] + shifts)
        f.attrs["n_views"] = k
        f.attrs["augmentation"] = json.dumps({"ops": ["flip"], "strengths": {}, "seed": 0})


def view_of_rows(bag: np.ndarray) -> np.ndarray:
    """For each row of a drawn bag: the view it came from (0: the plain features)."""
    return np.median(np.round(bag / VIEW_SHIFT), axis=1).astype(int)
