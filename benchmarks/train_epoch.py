"""Training throughput (slides/s): one epoch over cached bags, over bags read from their files,
and the pure model step on tensors already in memory (the ceiling).

    python benchmarks/train_epoch.py                                 # 64 bags of 2000 × 1024
    python benchmarks/train_epoch.py --threads 1                     # on a shared machine
    python benchmarks/train_epoch.py --device cuda --slides 256 --workers 8

Random float16 feature files (real slidemil feature files) are written once to ``--cache`` and
reused. The uncached figure reads every bag from its file on every access; files just written sit
in the OS page cache, so it measures HDF5 reading and decoding, not the disk. Each figure is the
best of ``--epochs`` epochs, after one warm-up epoch. Bags are standardised, as in training.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from slidemil.formats.feature_file import write_feature_file
from slidemil.models import build_model
from slidemil.training.bags import (
    BagDataset,
    fit_standardizer,
    load_cache,
    pad_bags,
    probe_feature_file,
)
from slidemil.training.loop import autocast, train_one_epoch


def feature_files(folder: Path, slides: int, instances: int, dim: int) -> list[Path]:
    """``slides`` bags of ``instances`` ± 50% rows, written once."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(slides):
        path = folder / f"bag_{index:04d}.h5"
        n = int(rng.integers(instances // 2, instances * 3 // 2 + 1))
        if not path.is_file():
            features = rng.normal(size=(n, dim)).astype(np.float16)
            coords = np.zeros((n, 2), np.int64)
            write_feature_file(path, features, coords, {"slide_id": path.stem, "encoder": "bench"})
        paths.append(path)
    return paths


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    text = f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} on {threads} threads"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def time_epochs(run_epoch, epochs: int, device: torch.device) -> float:
    """Best wall time of ``epochs`` epochs, after one warm-up epoch."""
    run_epoch(0)
    times = []
    for epoch in range(1, epochs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=64)
    parser.add_argument("--instances", type=int, default=2000, help="mean instances per bag")
    parser.add_argument("--dim", type=int, default=1024, help="feature size D")
    parser.add_argument("--max-patches", type=int, default=512)
    parser.add_argument("--model", default="abmil-gated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (uncached)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slidemil-bench/train_epoch"))
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    folder = args.cache / f"{args.slides}x{args.instances}x{args.dim}"
    paths = feature_files(folder, args.slides, args.instances, args.dim)
    bags = [probe_feature_file(p.stem, p) for p in paths]
    labels = [i % 2 for i in range(len(bags))]
    cache = load_cache(bags)
    standardizer = fit_standardizer(list(cache.values()))  # training standardises by default
    size_mb = sum(b.nbytes for b in bags) / 2**20

    torch.manual_seed(0)
    model = build_model(args.model, in_dim=args.dim, n_classes=2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def loader(cached: bool) -> DataLoader:
        dataset = BagDataset(
            bags, labels, max_patches=args.max_patches, sample=True,
            cache=cache if cached else None, standardizer=standardizer,
        )  # fmt: skip
        return DataLoader(
            dataset, batch_size=1, shuffle=True, collate_fn=pad_bags,
            num_workers=0 if cached else args.workers, pin_memory=amp,
        )  # fmt: skip

    def epoch_over(data: DataLoader):
        def run(epoch: int) -> None:
            data.dataset.set_epoch(epoch)
            train_one_epoch(model, data, optimizer, loss_fn, scaler, device, amp=amp, grad_clip=1.0)

        return run

    # the ceiling: the same bags, sampled once, already on the device
    sampled = [loader(True).dataset[i][0][None].to(device) for i in range(len(bags))]
    masks = [torch.ones(x.shape[:2], dtype=torch.bool, device=device) for x in sampled]
    targets = [torch.tensor([label], device=device) for label in labels]

    def model_steps(epoch: int) -> None:
        model.train()
        for features, mask, target in zip(sampled, masks, targets, strict=True):
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                logits = model(features, mask)[0]
            loss = loss_fn(logits.float(), target)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()

    results = {
        "model step only (tensors in memory)": time_epochs(model_steps, args.epochs, device),
        "epoch, cached bags (RAM)": time_epochs(epoch_over(loader(True)), args.epochs, device),
        f"epoch, uncached bags (HDF5 per access, {args.workers} workers)": time_epochs(
            epoch_over(loader(False)), args.epochs, device
        ),
    }
    print(hardware(device))
    print(
        f"{args.slides} bags, {args.instances} instances on average (float16, D={args.dim}, "
        f"{size_mb:.0f} MiB), max_patches {args.max_patches}, model {args.model}, "
        f"device {device}{' with AMP' if amp else ''}"
    )
    for name, seconds in results.items():
        print(f"{name:58s} {args.slides / seconds:8.1f} slides/s  ({seconds:.2f} s/epoch)")


if __name__ == "__main__":
    sys.exit(main())
