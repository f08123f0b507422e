"""Cost of augmented views at extraction: the augmentation alone, per op, against the encoder.

    python benchmarks/view_cost.py --device cpu --patch-size 224 --batch-size 32 --placement
    python benchmarks/view_cost.py --device cpu --patch-size 128 --end-to-end 128
    python benchmarks/view_cost.py --device cuda --patch-size 224 --batch-size 256 --encoders uni

(a) ``augment``: ms per patch of making one view (``slidemil.augmentation.Augmenter``) on
    random-but-smooth uint8 patches already on the device, for each op alone and for the
    default list (flip, rot90, hed, colour, blur).
(b) ``encode``: ms per patch of the encoder's preprocess + forward on the same batch, for a tiny
    convolutional encoder (two 3 x 3 convolutions and a pool: the case where augmentation weighs
    most) and the registered encoders named (``--encoders``, seeded random weights).
(c) ``view``: what one more view costs, augmentation + encoding, as a multiple of the plain
    pass (the plain pass is encoding alone).
(d) ``--placement`` (CPU only): extraction-like throughput (patches/s including the K views) with
    the augmentation done in the main process (as slidemil does) against done in one DataLoader
    reader worker that hands the main process K + 1 batches.
(e) ``--end-to-end N``: ``slidemil extract`` of N patches of a synthetic cohort (read, decode,
    encode, write) with 0 and with ``--views`` K views, per registered encoder; the cost of one
    view is (t_K - t_0) / (K t_0) of the plain extraction.

Every figure is the median of ``--repeats`` timed rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

from slidemil.augmentation import Augmenter, augment_spec
from slidemil.augmentation.spec import DEFAULT_OPS, OP_NAMES
from slidemil.encoders import get_encoder


class TinyEncoder(torch.nn.Module):
    """Two 3 x 3 convolutions and a global average pool (64-d): a near-free encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 64, 3, stride=2), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def patches(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth, tissue-coloured uint8 patches (B, 3, H, W), channels-last, on ``device``."""
    rng = np.random.default_rng(0)
    low = rng.uniform(60, 240, (batch, 3, size // 16, size // 16)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=(size, size), mode="bilinear")
    images = up.clamp(0, 255).to(torch.uint8)
    return images.to(device).contiguous(memory_format=torch.channels_last)


def timed(fn: Any, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` rounds after a warm-up."""
    fn()
    rounds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rounds.append(time.perf_counter() - start)
    return median(rounds)


def encoder_runner(name: str, device: torch.device) -> Any:
    """A function of a uint8 batch that runs preprocess + forward of encoder ``name``."""
    if name == "tiny":
        model = TinyEncoder().eval().to(device, memory_format=torch.channels_last)
        mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
        return lambda x: model((x.float() / 255 - mean) / 0.226)
    encoder = get_encoder(name, "random")
    model = encoder.model.to(device, memory_format=torch.channels_last)
    return lambda x: model(encoder.preprocess(x))


def placement(
    encode: Any, images: torch.Tensor, views: int, repeats: int, rounds: int = 4
) -> dict[str, float]:
    """Patches/s (counting views) with augmentation in the main process or in one worker."""
    from torch.utils.data import DataLoader, Dataset

    spec = augment_spec(views, DEFAULT_OPS, seed=0)
    keys = np.arange(images.shape[0], dtype=np.uint64)
    host = images.cpu()

    class Batches(Dataset):
        def __init__(self, in_worker: bool):
            self.in_worker = in_worker

        def __len__(self) -> int:
            return rounds

        def __getitem__(self, i: int) -> list[torch.Tensor]:
            if not self.in_worker:
                return [host]
            torch.set_num_threads(1)
            augment = Augmenter(spec)
            return [host, *(augment(host, keys, v) for v in range(views))]

    def run(in_worker: bool) -> float:
        augment = Augmenter(spec)
        loader = DataLoader(Batches(in_worker), batch_size=None, num_workers=1, prefetch_factor=2)
        start = time.perf_counter()
        done = 0
        with torch.inference_mode():
            for batch in loader:
                plain = batch[0].contiguous(memory_format=torch.channels_last)
                made = batch[1:] if in_worker else [augment(plain, keys, v) for v in range(views)]
                for x in [plain, *made]:
                    encode(x)
                    done += x.shape[0]
        return done / (time.perf_counter() - start)

    return {
        "main": median(run(False) for _ in range(repeats)),
        "worker": median(run(True) for _ in range(repeats)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoders", default="tiny,resnet18", help="comma-separated")
    parser.add_argument("--views", type=int, default=2, help="views in the placement test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: all]")
    parser.add_argument("--placement", action="store_true", help="run (d)")
    parser.add_argument("--end-to-end", type=int, default=0, help="patches; 0: skip (e)")
    parser.add_argument("--workers", type=int, default=1, help="reader workers in (e)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slidemil-bench-views"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = patches(args.batch_size, args.patch_size, device)
    keys = np.arange(args.batch_size, dtype=np.uint64)
    per_patch = 1000.0 / args.batch_size
    cpu = os.cpu_count()
    print(
        f"device {device}, {torch.get_num_threads()} torch threads of {cpu} CPUs, "
        f"patches {args.patch_size} px, batch {args.batch_size}, load {os.getloadavg()[0]:.1f}"
    )
    print("augment (ms/patch, one view)")
    with torch.inference_mode():
        augment_ms = {}
        for ops in [*((name,) for name in OP_NAMES), DEFAULT_OPS]:
            augment = Augmenter(augment_spec(1, ops, seed=0))
            seconds = timed(lambda a=augment: a(images, keys, 0), args.repeats, device)
            augment_ms[",".join(ops)] = seconds * per_patch
            print(f"  {','.join(ops):<28} {seconds * per_patch:8.3f}")
        default_ms = augment_ms[",".join(DEFAULT_OPS)]
        print("encode (ms/patch) and one more view (augment default ops + encode) / plain pass")
        encoders = {}
        for name in args.encoders.split(","):
            encoders[name] = encoder_runner(name, device)
            ms = timed(lambda e=encoders[name]: e(images), args.repeats, device) * per_patch
            view = (ms + default_ms) / ms
            print(f"  {name:<16} encode {ms:8.3f}  view {view:5.2f}x plain pass")
    if args.placement and device.type == "cpu":
        print(f"placement ({args.views} views, patches/s counting views, 1 reader worker)")
        for name, encode in encoders.items():
            rates = placement(encode, images, args.views, args.repeats)
            print(f"  {name:<16} main {rates['main']:8.1f}  worker {rates['worker']:8.1f}")
    if args.end_to_end:
        print(
            f"end to end ({args.end_to_end} patches, {args.views} views): seconds, cost of a view"
        )
        for name in args.encoders.split(","):
            if name != "tiny":
                plain, viewed = end_to_end(args, name)
                cost = (viewed - plain) / (args.views * plain)
                print(f"  {name:<16} views 0 {plain:7.2f} s  views {args.views} {viewed:7.2f} s  "
                      f"one view {cost:5.2f}x plain extraction")  # fmt: skip


def end_to_end(args: argparse.Namespace, encoder: str) -> tuple[float, float]:
    """Median seconds of ``slidemil extract`` with 0 and with ``args.views`` views."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from extract_setup import prepare_work
    from slidemil.extraction import extract

    work = prepare_work(
        args.cache, slides=2, size=4096, patch_size=args.patch_size, patches=args.end_to_end
    )
    options = {"encoder": encoder, "weights": "random", "device": args.device, "quiet": True,
               "batch_size": args.batch_size, "workers": args.workers}  # fmt: skip
    seconds: dict[int, list[float]] = {0: [], args.views: []}
    for _ in range(args.repeats):
        for views in seconds:  # interleaved, so the machine's load hits both alike
            shutil.rmtree(work / "features", ignore_errors=True)
            start = time.perf_counter()
            extract(work, **options, views=views)
            seconds[views].append(time.perf_counter() - start)
    return median(seconds[0]), median(seconds[args.views])


if __name__ == "__main__":
    main()
