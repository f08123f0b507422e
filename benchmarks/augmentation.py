"""Augmentation and stain normalisation across hospitals: train on two sites, test on the third.

    python benchmarks/augmentation.py --out /tmp/augmentation                    # 3 seeds
    python benchmarks/augmentation.py --out /tmp/augmentation --seeds 0 --slides 18  # smoke run

A synthetic cohort in three sites (``slidemil synth --sites 3``: each site stains and scans in
its own way, every site has both classes) is patched once (1 µm/px, 128 px patches) and encoded
once per arm with ResNet18 of seeded random weights, as ``slidemil demo`` does:

- ``plain``: the plain features;
- ``views``: plus K augmented views per patch (flips, quarter turns, HED stain jitter, colour
  jitter, blur), trained with ``--views random``; ``views (flip, rot90)``: geometric views only;
- ``macenko`` / ``reinhard``: every patch stain-normalised to one target patch first (a patch of
  the synthetic tissue as rendered before any site's staining, i.e. a lab's reference slide);
- ``macenko + views`` / ``reinhard + views``: both (and with geometric views only: after
  normalisation, colour jitter puts back the colour differences normalisation removed).

Every arm is trained with ``--site-holdout --folds 3``: each fold tests on one whole site that
its training and validation never saw. For comparison, ``plain, sites mixed`` trains the plain
features with ordinary patient-level 3-fold cross-validation, every site in every part (what a
study that ignores sites would report). A seed changes the validation split, the model's initial
weights, the bag sampling and the draws of views (not the cohort or the features). Each row of
the table is the mean ± std over seeds of the mean over the three held-out sites; the per-site
columns are each site's test balanced accuracy (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VIEWS = 4
GEOMETRIC = {"views": VIEWS, "augment": ("flip", "rot90")}
# arm -> extraction options (besides the encoder) and whether training draws the views
ARMS: dict[str, tuple[dict[str, Any], bool]] = {
    "plain": ({}, False),
    "views": ({"views": VIEWS}, True),
    "macenko": ({"stain_norm": "macenko"}, False),
    "macenko + views": ({"stain_norm": "macenko", "views": VIEWS}, True),
    "reinhard": ({"stain_norm": "reinhard"}, False),
    "reinhard + views": ({"stain_norm": "reinhard", "views": VIEWS}, True),
    "views (flip, rot90)": (GEOMETRIC, True),
    "macenko + views (flip, rot90)": ({"stain_norm": "macenko", **GEOMETRIC}, True),
    "reinhard + views (flip, rot90)": ({"stain_norm": "reinhard", **GEOMETRIC}, True),
}
TRAIN_OPTIONS = dict(
    folds=3, site_holdout=True, val_fraction=0.25, epochs=30, min_epochs=10, patience=10,
    lr=5e-4, device="cpu", quiet=True,
)  # fmt: skip
ENCODER = dict(encoder="resnet18", weights="random", device="cpu", batch_size=64)


def folder_name(arm: str) -> str:
    """``reinhard + views (flip, rot90)`` -> ``reinhard_views_flip_rot90``."""
    return re.sub(r"[^a-z0-9]+", "_", arm.lower()).strip("_")


def make_cohort(root: Path, slides: int, size: int, workers: int) -> Path:
    """synth --sites 3 -> patch (both skip finished slides); returns the work folder."""
    from slidemil.patching import patch
    from slidemil.synthetic import synth

    synth(root / "cohort", slides=slides, classes=2, sites=3, size=size, seed=0,
          lesion_fraction=(0.1, 0.2), max_slides_per_patient=2, workers=workers,
          quiet=True)  # fmt: skip
    patch(root / "cohort" / "cohort.csv", root / "work", mpp=1.0, patch_size=128,
          workers=workers, quiet=True)  # fmt: skip
    return root / "work"


def write_target(path: Path) -> Path:
    """A 256 px reference patch: synthetic tissue at 0.5 µm/px on a lesion's border (stroma and
    lesion), as rendered without any site's staining or scanner; of the windows centred on
    eight points of the border, the one with the most tissue."""
    import math

    from PIL import Image

    from slidemil.synthetic import make_scene

    scene = make_scene(np.random.default_rng(0), 2048, 1536, 0.5, 1, lesion_fraction=(0.3, 0.4))
    lesion = scene.lesions[0]
    corners = [
        (lesion.cx + lesion.rx * math.cos(a) - 128, lesion.cy + lesion.ry * math.sin(a) - 128)
        for a in np.linspace(0, 2 * math.pi, 8, endpoint=False)
    ]
    x0, y0 = max(corners, key=lambda c: scene.masks(c[0], c[1], 256, 256)[0].mean())
    Image.fromarray(scene.render(x0, y0, 256, 256)).save(path)
    return path


def extract_arms(work: Path, target: Path, workers: int) -> dict[str, float]:
    """Encode every arm into ``work/features/<arm>/`` (finished slides are skipped); seconds."""
    from slidemil.extraction import extract

    seconds = {}
    for arm, (options, _) in ARMS.items():
        began = time.perf_counter()
        stain = {"stain_target": str(target)} if "stain_norm" in options else {}
        extract(work, **ENCODER, **options, **stain, features_name=folder_name(arm),
                workers=workers, quiet=True)  # fmt: skip
        seconds[arm] = time.perf_counter() - began
        print(f"extracted {arm}: {seconds[arm]:.0f} s", flush=True)
    return seconds


def test_sites(run: Path) -> dict[int, str]:
    """Fold -> the site its test part holds (from the run's splits.csv)."""
    splits = pd.read_csv(run / "splits.csv", dtype=str)
    sites = {}
    for fold in sorted(int(f) for f in splits["fold"].unique()):
        tested = splits[(splits["fold"] == str(fold)) & (splits["part"] == "test")]
        sites[fold] = ";".join(sorted(tested["site"].unique()))
    return sites


MIXED = "plain, sites mixed"


def train_arms(work: Path, root: Path, seeds: list[int]) -> pd.DataFrame:
    """A row per (arm, seed, held-out site) with its test metrics (site ``mixed`` for the
    baseline whose test parts hold every site)."""
    from slidemil.training import train

    rows = []
    for seed in seeds:
        for arm in [*ARMS, MIXED]:
            began = time.perf_counter()
            run = root / "runs" / f"seed{seed}_{folder_name(arm)}"
            uses_views = arm != MIXED and ARMS[arm][1]
            options = {**TRAIN_OPTIONS, "site_holdout": arm != MIXED}
            result = train(work, run, encoder=folder_name("plain" if arm == MIXED else arm),
                           seed=seed, views="random" if uses_views else "none",
                           **options)  # fmt: skip
            sites = test_sites(run) if arm != MIXED else dict.fromkeys(result.folds, "mixed")
            for fold, metrics in result.folds.items():
                rows.append({"arm": arm, "seed": seed, "fold": fold, "site": sites[fold],
                             **metrics})  # fmt: skip
            accuracy = np.mean([m["balanced_accuracy"] for m in result.folds.values()])
            print(f"seed {seed}, {arm}: {time.perf_counter() - began:.0f} s, balanced accuracy "
                  f"{accuracy:.3f}", flush=True)  # fmt: skip
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of the mean over held-out sites, and of each site."""

    def cell(values: pd.Series) -> str:
        return f"{values.mean():.3f} ± {values.std(ddof=0):.3f}"

    overall = frame.groupby(["arm", "seed"], sort=False)["balanced_accuracy"].mean()
    table = overall.groupby(level="arm", sort=False).apply(cell).to_frame("mean over sites")
    for site, rows in frame[frame["site"] != "mixed"].groupby("site"):
        table[f"test on {site}"] = rows.groupby("arm", sort=False)["balanced_accuracy"].apply(cell)
    return table.fillna("—")


def markdown(table: pd.DataFrame) -> str:
    """The table as a Markdown table (as docs/augmentation.md shows it)."""
    header = ["features", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *row]) + " |" for i, row in zip(
        table.index, table.astype(str).to_numpy().tolist(), strict=True)]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slides", type=int, default=48, help="slides in the cohort (3 sites)")
    parser.add_argument("--size", type=int, default=1536, help="slide side in px at 0.5 µm/px")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = make_cohort(args.out, args.slides, args.size, args.workers)
    target = write_target(args.out / "target.png")
    seconds = extract_arms(work, target, max(0, args.workers - 1))
    cohort = pd.read_csv(work / "cohort.csv")
    print(f"features ready in {time.perf_counter() - started:.0f} s; slides per site and class:"
          f"\n{pd.crosstab(cohort['site'], cohort['label'])}", flush=True)  # fmt: skip
    frame = train_arms(work, args.out, args.seeds)
    frame.to_csv(args.out / "results.csv", index=False)
    table = summarise(frame)
    print(markdown(table))
    summary = {"seeds": args.seeds, "extract_seconds": seconds, "table": table.to_dict()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
