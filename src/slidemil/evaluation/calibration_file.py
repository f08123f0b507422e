"""``fold_<k>/calibration.json``: a fold's fitted temperature, stored next to its checkpoint.

Written by ``slidemil evaluate RUN --calibrate temperature`` (fitted on the fold's
``val_predictions.csv`` only) and read by ``predict --calibrate temperature`` and by anything
else that deploys a fold's model (:func:`load_temperature`). The file records the SHA-256 of the
``checkpoint_best.pt`` it was fitted for, so a retrained fold's stale temperature is refused
instead of silently applied. Imports nothing heavy: prediction loads it for every fold.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from slidemil import atomic
from slidemil.errors import ArtifactError

CALIBRATION_FILE = "calibration.json"
CHECKPOINT = "checkpoint_best.pt"
FORMAT_VERSION = 1
_FIX = "run `slidemil evaluate RUN --calibrate temperature` to (re)fit it"


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a checkpoint file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_calibration(fold_dir: str | Path, temperature: float, fit: dict[str, Any]) -> Path:
    """Write ``fold_dir/calibration.json`` atomically: the temperature, the checkpoint's digest
    and ``fit`` (what it was fitted on and the validation figures before and after)."""
    fold_dir = Path(fold_dir)
    checkpoint = fold_dir / CHECKPOINT
    record = {
        "format_version": FORMAT_VERSION,
        "method": "temperature",
        "temperature": float(temperature),
        "checkpoint": CHECKPOINT,
        "checkpoint_sha256": checkpoint_digest(checkpoint) if checkpoint.is_file() else None,
        **fit,
    }
    path = fold_dir / CALIBRATION_FILE
    atomic.write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_calibration(fold_dir: str | Path) -> dict[str, Any] | None:
    """The fold's calibration record, or ``None`` when it has none; :class:`ArtifactError` when
    the file is unreadable, of another format or fitted for another checkpoint."""
    fold_dir = Path(fold_dir)
    path = fold_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(path, f"unreadable calibration record: {e}", _FIX) from e
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(path, f"not a version {FORMAT_VERSION} calibration record", _FIX)
    temperature = record.get("temperature")
    if (
        not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ArtifactError(path, f"temperature must be a positive number, got {temperature!r}")
    stored = record.get("checkpoint_sha256")
    checkpoint = fold_dir / CHECKPOINT
    if stored is not None and checkpoint.is_file() and checkpoint_digest(checkpoint) != stored:
        raise ArtifactError(path, f"was fitted for another {CHECKPOINT} (fold retrained?)", _FIX)
    return record


def load_temperature(fold_dir: str | Path, *, required: bool = True) -> float | None:
    """The temperature T of a fold (divide the model's logits by T before the softmax).

    ``required=False`` returns ``None`` for a fold without ``calibration.json``; otherwise its
    absence is an :class:`ArtifactError` that says how to fit one.
    """
    record = read_calibration(fold_dir)
    if record is None:
        if required:
            raise ArtifactError(Path(fold_dir) / CALIBRATION_FILE, "no calibration fitted", _FIX)
        return None
    return float(record["temperature"])
