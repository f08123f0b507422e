"""Extraction throughput: ``slidemil extract`` against the encoder alone and a naive loop.

    python benchmarks/extract_throughput.py --encoder resnet18 --device cpu --patches 1024
    python benchmarks/extract_throughput.py --encoder resnet50-trunc --device cuda \\
        --batch-size 512 --workers 8 --patches 65536 --slides 16 --size 16384

(a) ``encoder ratio``: end-to-end extraction (read + decode in DataLoader workers, transfer,
    forward, HDF5 writes; the runner's wall time over all slides) in patches/s, divided by the
    encoder's own forward throughput on random uint8 batches already on the device, with the
    same batch size, preprocessing, precision and memory format. Target: >= 0.80.
(b) ``naive ratio``: the same extraction divided by a CLAM-style single-process loop
    (OpenSlide ``read_region`` per patch, then encode, no workers) on the same patches, with the
    encoder run the same way (channels-last, same autocast), so it measures the pipeline.

Weights are seeded random by default (``--weights random``): throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from extract_setup import hardware, naive_extract, prepare_work
from slidemil.encoders import get_encoder
from slidemil.extraction import ExtractConfig, extract
from slidemil.extraction.run import autocast_dtype


def encoder_throughput(
    name: str, weights: str, device: str, batch_size: int, patch_size: int, seconds: float
) -> float:
    """Patches/s of preprocess + forward on random uint8 batches resident on ``device``."""
    import contextlib

    encoder = get_encoder(name, weights)
    dev = torch.device(device)
    model = encoder.model.to(dev, memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    autocast = autocast_dtype("auto", encoder, dev)
    context = (
        torch.autocast(dev.type, dtype=autocast) if autocast else contextlib.nullcontext()
    )  # fmt: skip
    batch = torch.randint(0, 256, (batch_size, patch_size, patch_size, 3), dtype=torch.uint8)
    batch = batch.to(dev).permute(0, 3, 1, 2)  # the same NHWC-as-channels-last view as extract

    def run(n: int) -> None:
        with torch.inference_mode(), context:
            for _ in range(n):
                model(encoder.preprocess(batch))
        if cuda:
            torch.cuda.synchronize(dev)

    run(2)  # warm-up: cuDNN autotuning, allocator, lazy init
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        run(1)
        n += 1
    return n * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--weights", default="random", help="random, a file, or '' (pretrained)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patches", type=int, default=1024, help="patches extracted in total")
    parser.add_argument("--patch-size", type=int, default=256, help="px at 0.5 µm/px")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=8192, help="slide side, px at 0.5 µm/px")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--seconds", type=float, default=10.0, help="encoder-only timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--skip-naive", action="store_true", help="only the encoder ratio")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "slidemil-bench-extract"
    )
    args = parser.parse_args()
    weights = args.weights or None

    print(f"hardware: {hardware(args.device)}")
    print(f"load average at the start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    work = prepare_work(
        args.cache, slides=args.slides, size=args.size, patch_size=args.patch_size,
        patches=args.patches,
    )  # fmt: skip
    print(
        f"setup: {args.encoder} ({weights or 'pretrained'} weights) on {args.device}, "
        f"batch {args.batch_size}, {args.workers} workers, {args.patches} patches of "
        f"{args.patch_size} px in {args.slides} slides"
    )

    config = ExtractConfig(
        encoder=args.encoder, weights=weights, device=args.device, batch_size=args.batch_size,
        workers=args.workers, dtype=args.dtype, quiet=True,
    )  # fmt: skip
    naive_encoder = get_encoder(args.encoder, weights)
    autocast = autocast_dtype("auto", naive_encoder, torch.device(args.device))
    rates: dict[str, list[float]] = {"encoder": [], "extract": [], "naive": []}
    # The three measurements are interleaved and repeated so that, on a shared machine, each
    # round compares timings taken side by side.
    for round_ in range(args.repeats):
        rates["encoder"].append(
            encoder_throughput(
                args.encoder, weights, args.device, args.batch_size, args.patch_size,
                args.seconds,
            )
        )  # fmt: skip
        shutil.rmtree(work / "features", ignore_errors=True)
        summary = extract(work, config)
        if summary.failed:
            raise SystemExit(f"extraction failed: {summary.failed}")
        rates["extract"].append(args.patches / summary.seconds)
        if not args.skip_naive:
            rates["naive"].append(
                naive_extract(
                    work, naive_encoder, args.device, args.batch_size,
                    work / "features" / "naive", autocast,
                )
            )  # fmt: skip
        shown = ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items() if v)
        print(f"round {round_ + 1}: {shown} patches/s")

    # Ratios are taken within each round (its three timings are minutes apart at most) and
    # their median is reported.
    encoder_ratio = median(e / f for e, f in zip(rates["extract"], rates["encoder"], strict=True))
    print(f"encoder alone: {median(rates['encoder']):.1f} patches/s (median of {args.repeats})")
    print(f"slidemil extract: {median(rates['extract']):.1f} patches/s")
    print(f"encoder ratio: {encoder_ratio:.2f} (target >= 0.80)")
    if rates["naive"]:
        naive_ratio = median(e / n for e, n in zip(rates["extract"], rates["naive"], strict=True))
        print(f"naive loop: {median(rates['naive']):.1f} patches/s")
        print(f"naive ratio: {naive_ratio:.2f} (slidemil / CLAM-style loop)")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
