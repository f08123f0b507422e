"""Shared by the extraction benchmarks: a patched synthetic cohort, the hardware, a naive loop.

The work folder is cached under ``--cache`` (writing and patching slides takes a while) and its
patch files are cut to the requested patch count, spread evenly over the slides.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.formats.patch_file import read_patch_file, write_patch_file
from slidemil.patching import patch
from slidemil.synthetic import synth


def prepare_work(cache: Path, *, slides: int, size: int, patch_size: int, patches: int) -> Path:
    """A work folder with ``patches`` patches of ``patch_size`` px at 0.5 µm/px in ``slides``."""
    cohort = cache / f"cohort_{slides}x{size}"
    synth(cohort, slides=slides, classes=2, size=size, seed=1, quiet=True)
    full = cache / f"patched_{slides}x{size}_{patch_size}"
    summary = patch(
        cohort / "cohort.csv", full, patch_size=patch_size, mpp=0.5, workers=os.cpu_count() or 1,
        quiet=True, previews=False,
    )  # fmt: skip
    available = sum(summary.patch_counts.values())
    if available < patches:
        raise SystemExit(f"the cohort has {available} patches; raise --slides or --size")
    work = cache / f"work_{slides}x{size}_{patch_size}_{patches}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "patches").mkdir(parents=True)
    shutil.copy(full / "cohort.csv", work / "cohort.csv")
    for slide_id, keep in spread(summary.patch_counts, patches).items():
        patch_set = read_patch_file(full / "patches" / f"{slide_id}.h5")
        patch_set.coords = patch_set.coords[:keep]
        write_patch_file(work / "patches" / f"{slide_id}.h5", patch_set)
    return work


def spread(counts: dict[str, int], total: int) -> dict[str, int]:
    """``total`` patches taken as evenly as the slides allow (smallest slides filled first)."""
    keep: dict[str, int] = {}
    ordered = sorted(counts, key=counts.get)
    for i, slide_id in enumerate(ordered):
        keep[slide_id] = min(counts[slide_id], total // (len(ordered) - i))
        total -= keep[slide_id]
    return keep


def hardware(device: str) -> str:
    """One line: CPU model and cores, torch version, and the GPU when one is used."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"CPU {cpu}, {os.cpu_count()} cores",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
    ]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    return "; ".join(parts)


def naive_extract(
    work: Path, encoder: Any, device: str, batch_size: int, out: Path, autocast: Any = None
) -> float:
    """CLAM-style baseline: one process, OpenSlide ``read_region`` per patch, then encode.

    The encoder runs as slidemil runs it (channels-last, the same ``autocast`` dtype), so the
    ratio measures the reading pipeline alone. Returns patches per second over all slides
    (reading, encoding and writing, no workers).
    """
    import contextlib

    import openslide
    import pandas as pd
    import torch

    context = torch.autocast(device.split(":")[0], dtype=autocast) if autocast else None

    cohort = pd.read_csv(work / "cohort.csv")
    model = encoder.model.to(device, memory_format=torch.channels_last)  # as slidemil does
    out.mkdir(parents=True, exist_ok=True)
    total, start = 0, time.perf_counter()
    for row in cohort.itertuples():
        patches = read_patch_file(work / "patches" / f"{row.slide_id}.h5")
        wsi = openslide.OpenSlide(str(row.path))
        features = []
        for begin in range(0, len(patches), batch_size):
            images = [
                np.asarray(
                    wsi.read_region(
                        (int(x), int(y)), patches.read_level, (patches.read_size,) * 2
                    ).convert("RGB")
                )
                for x, y in patches.coords[begin : begin + batch_size]
            ]
            batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(device)
            with torch.inference_mode(), context or contextlib.nullcontext():
                features.append(model(encoder.preprocess(batch)).float().cpu().numpy())
        wsi.close()
        with h5py.File(out / f"{row.slide_id}.h5", "w") as f:
            f["features"] = np.concatenate(features)
            f["coords"] = patches.coords
        total += len(patches)
    return total / (time.perf_counter() - start)
