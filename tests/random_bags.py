"""A factory for training inputs: random feature bags with a planted signal, and a cohort.

``make_random_work(root)`` writes ``root/cohort.csv`` and ``root/features/<encoder>/<id>.h5``
(real slidemil feature files). Every bag is Gaussian noise; in a bag of class k, a few "signal"
instances also carry +``strength`` on feature block k, so a model must find those instances to
classify the bag (and its attention should rank them first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slidemil.formats.feature_file import write_feature_file


@dataclass
class RandomWork:
    """What was written: the work folder, the encoder folder name and the planted instances."""

    root: Path
    encoder: str
    dim: int
    class_names: list[str]
    signal: dict[str, np.ndarray] = field(default_factory=dict)  # slide id -> instance rows

    def feature_path(self, slide_id: str) -> Path:
        return self.root / "features" / self.encoder / f"{slide_id}.h5"


def make_random_work(
    root: str | Path,
    *,
    patients: int = 24,
    slides_per_patient: int = 2,
    classes: int = 2,
    dim: int = 32,
    instances: tuple[int, int] = (20, 40),
    signal_instances: int = 3,
    strength: float = 3.0,
    encoder: str = "random-encoder",
    dtype: str = "float16",
    split: list[str] | None = None,
    class_patients: Sequence[int] | None = None,
    seed: int = 0,
) -> RandomWork:
    """Write a work folder of ``patients × slides_per_patient`` bags; patients cycle classes.

    ``class_patients`` (patients per class, e.g. ``(12, 6)``) replaces ``patients`` and
    ``classes`` for an imbalanced cohort; ``split`` values (a cohort ``split`` column) are given to
    the patients in turn.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    if class_patients is None:
        labels = [p % classes for p in range(patients)]
    else:
        classes = len(class_patients)
        labels = [k for k, n in enumerate(class_patients) for _ in range(n)]
    names = [f"class_{k}" for k in range(classes)]
    block = dim // classes
    work = RandomWork(root, encoder, dim, names)
    rows = []
    for patient, label in enumerate(labels):
        for slide in range(slides_per_patient):
            slide_id = f"p{patient:03d}_s{slide}"
            n = int(rng.integers(instances[0], instances[1] + 1))
            features = rng.normal(size=(n, dim)).astype(np.float32)
            rows_with_signal = rng.choice(n, signal_instances, replace=False)
            features[rows_with_signal, label * block : (label + 1) * block] += strength
            coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
            write_feature_file(
                work.feature_path(slide_id),
                features.astype(dtype),
                coords,
                {"slide_id": slide_id, "encoder": encoder},
            )
            work.signal[slide_id] = np.sort(rows_with_signal)
            rows.append(
                {
                    "slide_id": slide_id,
                    "path": f"slides/{slide_id}.svs",
                    "label": names[label],
                    "patient_id": f"patient_{patient:03d}",
                }
            )
    frame = pd.DataFrame(rows)
    if split is not None:
        frame["split"] = [split[int(p[-3:]) % len(split)] for p in frame["patient_id"]]
    root.mkdir(parents=True, exist_ok=True)
    frame.to_csv(root / "cohort.csv", index=False)
    return work
