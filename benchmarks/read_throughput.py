"""Reader throughput on one core: OpenSlide vs the raw-tile reader, patches per second.

    python benchmarks/read_throughput.py                       # 8192 px slides, cached in /tmp
    python benchmarks/read_throughput.py --size 4096 --patches 500   # a quick run

Slides (written once into ``--cache``): a JPEG Aperio SVS (this project's writer, 256 px tiles),
the same pixels as a JPEG 2000 SVS (Aperio 33003, YCbCr, 240 px tiles re-encoded from the first)
and as a generic tiled TIFF. Each reader opens the slide afresh and reads every patch of a
256 px grid once, in consecutive rows through the middle of the slide where the tissue is
(tile-aligned: one tile per patch; offset by half a patch: four tiles per patch), so each figure
includes the decode of every tile it needs. "tiles + decode_jpeg" is the
device path run on the CPU: raw tile bytes fetched, decoded in batches by torchvision.

``--end-to-end`` times whole stages on a synthetic cohort with ``--reader openslide`` and
``--reader tiles``: ``patch`` (112 px at 0.5 µm/px), ``extract`` (resnet18, random weights, one
reader worker) and ``heatmap`` (overview + gallery, from attention files with random scores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from slidemil.formats.attention_file import AttentionMap, write_attention_file
from slidemil.formats.patch_file import read_patch_file
from slidemil.readers import OpenSlideReader, pick_reader
from slidemil.readers.device_decode import can_fetch_jpeg, decode_jpeg_patches, fetch_jpeg_patches
from slidemil.synthetic import make_scene, synth, write_pyramid

PATCH = 256
BATCH = 64


def jpeg_svs(cache: Path, size: int) -> Path:
    path = cache / f"read_{size}px_jpeg.svs"
    if not path.is_file():
        height = round(size * 0.75)
        scene = make_scene(np.random.default_rng(0), size, height, 0.25, class_index=0)
        write_pyramid(path, size, height, scene.render, mpp=0.25, magnification=40)
    return path


def generic_tiff(cache: Path, size: int) -> Path:
    path = cache / f"read_{size}px_generic.tif"
    if not path.is_file():
        height = round(size * 0.75)
        scene = make_scene(np.random.default_rng(0), size, height, 0.25, class_index=0)
        write_pyramid(path, size, height, scene.render, mpp=0.25, vendor="generic")
    return path


def jp2k_svs(cache: Path, size: int, source: Path) -> Path:
    """Level 0 of ``source`` re-encoded as Aperio 33003 (YCbCr JPEG 2000) tiles of 240 px."""
    path = cache / f"read_{size}px_jp2k.svs"
    if path.is_file():
        return path
    tile = 240
    with OpenSlideReader(source) as reader:
        width, height = reader.dimensions
        description = reader.properties["tiff.ImageDescription"]
        rows = range(0, height, tile)
        cols = range(0, width, tile)

        def tiles():
            for y in rows:
                for x in cols:
                    rgb = reader.read_region((x, y), 0, (tile, tile))
                    yield imagecodecs.jpeg2k_encode(
                        _ycbcr(rgb), level=45, codecformat="J2K", mct=False
                    )

        with tifffile.TiffWriter(path) as tw:
            tw.write(
                tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                compression=33003, photometric="rgb", description=description, metadata=None,
            )  # fmt: skip
    return path


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    planes = [
        0.299 * r + 0.587 * g + 0.114 * b,
        -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
        0.5 * r - 0.418688 * g - 0.081312 * b + 128,
    ]
    return np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)


def grid(path: Path, offset: int, limit: int) -> list[tuple[int, int]]:
    with OpenSlideReader(path) as reader:
        width, height = reader.dimensions
    locations = [
        (x, y)
        for y in range(offset, height - PATCH + 1, PATCH)
        for x in range(offset, width - PATCH + 1, PATCH)
    ]
    start = max(0, len(locations) // 2 - limit // 2)  # whole rows through the tissue
    return locations[start : start + limit]


def rate(path: Path, reader: str, locations: list[tuple[int, int]]) -> float:
    """Patches per second, reading each location once with a freshly opened reader."""
    start = time.perf_counter()
    opened = OpenSlideReader(path) if reader == "openslide" else pick_reader(path, "tiles")
    with opened:
        if reader == "device-cpu":
            if not can_fetch_jpeg(opened, 0):
                return float("nan")
            for i in range(0, len(locations), BATCH):
                batch = fetch_jpeg_patches(opened, locations[i : i + BATCH], 0, (PATCH, PATCH))
                decode_jpeg_patches(batch, "cpu")
        else:
            for i in range(0, len(locations), BATCH):
                opened.read_regions(locations[i : i + BATCH], 0, (PATCH, PATCH))
    return len(locations) / (time.perf_counter() - start)


def end_to_end(cache: Path, slides: int, size: int) -> None:
    """Wall time of patch, extract and heatmap with each reader, on ``slides`` synthetic slides."""
    from slidemil.extraction import extract
    from slidemil.heatmaps import heatmap
    from slidemil.patching import patch

    cohort = cache / f"cohort_{slides}x{size}"
    synth(cohort, slides=slides, classes=2, size=size, mpp=[0.25, 0.5], seed=11, quiet=True)
    print(f"{slides} slides of {size} px (0.25 and 0.5 µm/px), one process, wall time in s")
    print("| stage | --reader openslide | --reader tiles | × |")
    print("|---|---|---|---|")
    times: dict[str, dict[str, float]] = {}
    for reader in ("openslide", "tiles"):
        work = cache / f"e2e_{reader}"
        shutil.rmtree(work, ignore_errors=True)
        stages = times.setdefault(reader, {})
        start = time.perf_counter()
        patch(cohort / "cohort.csv", work, mpp=0.5, patch_size=112, workers=1, quiet=True,
              reader=reader)  # fmt: skip
        stages["patch"] = time.perf_counter() - start
        start = time.perf_counter()
        extract(work, encoder="resnet18", weights="random", device="cpu", batch_size=64,
                workers=1, quiet=True, reader=reader)  # fmt: skip
        stages["extract (resnet18, 112 px)"] = time.perf_counter() - start
        predictions = work / "predictions"
        rng = np.random.default_rng(0)
        for patch_file in sorted((work / "patches").glob("*.h5")):
            patches = read_patch_file(patch_file)
            raw = rng.normal(size=(len(patches), 1)).astype(np.float32)
            attention = np.exp(raw) / np.exp(raw).sum()
            attrs = {
                "slide_id": patches.slide_id, "slide_path": patches.slide_path,
                "models": ["fold_0"], "class_names": ["a", "b"], "probabilities": [0.5, 0.5],
                "predicted": "a", **patches.geometry(),
            }  # fmt: skip
            write_attention_file(
                predictions / "attention" / patch_file.name,
                AttentionMap(patches.coords, attention, raw, attrs),
            )
        start = time.perf_counter()
        heatmap(predictions, work / "heatmaps", quiet=True, reader=reader, top_k=16)
        stages["heatmap (overview + gallery)"] = time.perf_counter() - start
    for stage in times["openslide"]:
        reference, tiles = times["openslide"][stage], times["tiles"][stage]
        print(f"| {stage} | {reference:.1f} | {tiles:.1f} | {reference / tiles:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="longer side, level-0 px")
    parser.add_argument("--patches", type=int, default=600, help="patches per measurement")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slidemil-bench"))
    parser.add_argument("--end-to-end", action="store_true", help="time whole stages instead")
    parser.add_argument("--slides", type=int, default=8, help="--end-to-end: cohort size")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.end_to_end:
        end_to_end(args.cache, args.slides, args.size)
        return
    jpeg = jpeg_svs(args.cache, args.size)
    slides = {
        "Aperio SVS, JPEG 256 px": jpeg,
        "Aperio SVS, JPEG 2000 (33003) 240 px": jp2k_svs(args.cache, args.size, jpeg),
        "generic tiled TIFF, JPEG 256 px": generic_tiff(args.cache, args.size),
    }
    rate(jpeg, "device-cpu", grid(jpeg, 0, 8))  # torchvision's first call loads its decoder
    print(f"{args.patches} patches of {PATCH} px per figure, one core, patches/s")
    header = "| slide | grid | OpenSlide | tiles | × | tiles + decode_jpeg (CPU) |"
    print(header)
    print("|---|---|---|---|---|---|")
    for name, path in slides.items():
        for label, offset in (("tile-aligned", 0), ("half-patch offset", PATCH // 2)):
            locations = grid(path, offset, args.patches)
            reference = rate(path, "openslide", locations)
            tiles = rate(path, "tiles", locations)
            device = rate(path, "device-cpu", locations)
            print(
                f"| {name} | {label} | {reference:,.0f} | {tiles:,.0f} | "
                f"{tiles / reference:.1f}× | {device:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
