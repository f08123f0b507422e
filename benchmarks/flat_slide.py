"""Peak memory of ``slidemil patch`` and ``slidemil heatmap`` on a flat (single-level) slide.

    python benchmarks/flat_slide.py --size 50000 --cache /tmp/slidemil-bench   # the target
    python benchmarks/flat_slide.py --size 12000                               # a quick run
    python benchmarks/flat_slide.py --size 50000 --tiff                        # + TIFF overlay

The slide is a tiled JPEG TIFF with no pyramid, µm/px in its resolution tags, written tile by
tile with tifffile (the way converters and some scanners export), cached in ``--cache``. Its
thumbnail, the segmentation image and the heat map's background all come from level 0. Each
command runs as its own process (the real CLI); its wall time and peak resident memory
(``ru_maxrss`` from ``os.wait4``) are printed. The attention file the heat map needs is written
with the project's writer over the patch file's coordinates (no model is involved).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from slidemil.formats.attention_file import AttentionMap, write_attention_file
from slidemil.formats.patch_file import read_patch_file
from slidemil.synthetic import make_scene

TILE = 512


def slide_path(cache: Path, size: int, mpp: float) -> Path:
    path = cache / f"flat_{size}px_{mpp}mpp.tif"
    if path.is_file():
        return path
    print(f"writing {path} (once; cached for later runs) ...", flush=True)
    start = time.perf_counter()
    scene = make_scene(np.random.default_rng(0), size, size, mpp, class_index=0)

    def tiles():
        for y in range(0, size, TILE):
            for x in range(0, size, TILE):
                yield scene.render(x, y, TILE, TILE)

    resolution = 1e4 / mpp  # px per cm
    partial = path.with_name(f".{path.name}.partial")
    tifffile.imwrite(
        partial, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE),
        photometric="rgb", compression="jpeg", compressionargs={"level": 85},
        resolution=(resolution, resolution), resolutionunit="CENTIMETER", metadata=None,
        bigtiff=True,
    )  # fmt: skip
    partial.rename(path)
    print(
        f"  written in {time.perf_counter() - start:.0f} s, {path.stat().st_size / 2**20:.0f} MiB"
    )
    return path


def run(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return its wall time (s) and peak resident memory (MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024


def write_attention(work: Path, predictions: Path, slide_id: str, slide: Path) -> int:
    """An attention file over the patch file's coordinates: a smooth score peaking at one spot."""
    patches = read_patch_file(work / "patches" / f"{slide_id}.h5")
    coords = patches.coords.astype(np.float64)
    centre = coords.mean(axis=0) + coords.std(axis=0) * 0.5
    distance = np.linalg.norm(coords - centre, axis=1)
    raw = -distance / max(1.0, float(distance.std()))
    weights = np.exp(raw - raw.max())
    attrs = {
        "slide_id": slide_id,
        "slide_path": str(slide),
        "models": ["fold_0"],
        "patch_size_level0": float(patches.patch_size_level0),
        "patch_size": patches.patch_size,
        "read_level": patches.read_level,
        "read_size": patches.read_size,
        "step": patches.step,
        "slide_mpp": patches.slide_mpp,
        "slide_dimensions": list(patches.slide_dimensions),
    }
    path = predictions / "attention" / f"{slide_id}.h5"
    write_attention_file(path, AttentionMap(patches.coords, weights / weights.sum(), raw, attrs))
    return len(coords)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50_000, help="side of the square slide, px")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of the slide")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slidemil-bench"))
    parser.add_argument("--tiff", action="store_true", help="also time the pyramidal TIFF overlay")
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    slide = slide_path(args.cache, args.size, args.mpp)
    root = args.cache / f"flat_run_{args.size}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    cohort = root / "cohort.csv"
    with cohort.open("w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "path"], ["flat", str(slide)]])
    cli = [str(Path(sys.executable).with_name("slidemil"))]
    rows = []
    work, predictions = root / "work", root / "predictions"
    wall, rss = run([*cli, "patch", str(cohort), "--out", str(work), "--mpp", "0.5",
                     "--workers", "1", "--quiet"])  # fmt: skip
    rows.append(("slidemil patch (segmentation, grid, preview)", wall, rss))
    n = write_attention(work, predictions, "flat", slide)
    wall, rss = run([*cli, "heatmap", str(predictions), "--out", str(root / "heatmaps"), "--quiet"])
    rows.append(("slidemil heatmap (figure, gallery, GeoJSON)", wall, rss))
    if args.tiff:
        wall, rss = run([*cli, "heatmap", str(predictions), "--out", str(root / "heatmaps_tiff"),
                         "--tiff", "--no-geojson", "--top-k", "0", "--quiet"])  # fmt: skip
        rows.append(("slidemil heatmap --tiff (full-resolution overlay)", wall, rss))
    size_mib = slide.stat().st_size / 2**20
    print(f"\nflat slide {args.size} x {args.size} px at {args.mpp} µm/px, one level, "
          f"{size_mib:.0f} MiB JPEG tiles; {n} patches of 256 px at 0.5 µm/px")  # fmt: skip
    print("| step | wall s | peak RSS MiB |\n|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
