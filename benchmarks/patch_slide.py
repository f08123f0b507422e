"""Time tissue segmentation + patch grid + patch file for one large synthetic slide, on one core.

    python benchmarks/patch_slide.py --size 100000 --cache /tmp/slidemil-bench   # the target
    python benchmarks/patch_slide.py --size 20000                                # a quick run

Writing the slide takes minutes at 100 000 px, so it is cached in ``--cache`` and reused.
Prints the wall time of each part and the peak resident memory (``resource.getrusage``).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

from slidemil.patching.run import PatchConfig, patch_slide
from slidemil.synthetic import make_scene, write_pyramid


def slide_path(cache: Path, size: int, mpp: float) -> Path:
    path = cache / f"bench_{size}px_{mpp}mpp.svs"
    if not path.is_file():
        print(f"writing {path} (once; cached for later runs) ...", flush=True)
        start = time.perf_counter()
        height = round(size * 0.75)
        scene = make_scene(np.random.default_rng(0), size, height, mpp, class_index=0)
        write_pyramid(path, size, height, scene.render, mpp=mpp, magnification=round(10 / mpp))
        print(f"  written in {time.perf_counter() - start:.1f} s")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="longer side, level-0 px")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of the slide")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slidemil-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    path = slide_path(args.cache, args.size, args.mpp)
    out = args.cache / f"work_{args.size}"
    config = PatchConfig(mpp=args.target_mpp, patch_size=args.patch_size, workers=1, quiet=True)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        count = patch_slide("bench", str(path), None, None, config, str(out))
        times.append(time.perf_counter() - start)
    no_preview = config.model_copy(update={"previews": False})
    start = time.perf_counter()
    patch_slide("bench", str(path), None, None, no_preview, str(out))
    without_preview = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"slide {args.size} px at {args.mpp} µm/px -> {count} patches of {args.patch_size} px "
          f"at {args.target_mpp} µm/px")  # fmt: skip
    print(f"segmentation + grid + file + preview: best {min(times):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
    print(f"without preview: {without_preview:.2f} s")
    print(f"peak RSS: {peak_mb:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
