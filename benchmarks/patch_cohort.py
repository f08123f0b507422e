"""Slides per second of ``slidemil patch`` with 1 and 2 worker processes on a synthetic cohort.

python benchmarks/patch_cohort.py --slides 12 --size 4096
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from slidemil.patching import patch
from slidemil.synthetic import synth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--size", type=int, default=4096, help="longer side, px at 0.5 µm/px")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "slidemil-bc")
    args = parser.parse_args()

    cohort = args.cache / f"cohort_{args.slides}x{args.size}"
    synth(cohort, slides=args.slides, classes=2, size=args.size, mpp=[0.25, 0.5], quiet=True)
    for workers in args.workers:
        out = args.cache / f"work_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        summary = patch(cohort / "cohort.csv", out, workers=workers, quiet=True)
        rate = len(summary.run.done) / summary.run.seconds
        print(f"workers={workers}: {len(summary.run.done)} slides in {summary.run.seconds:.1f} s "
              f"= {rate:.2f} slides/s ({sum(summary.patch_counts.values())} patches, "
              f"{len(summary.failed)} failed)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
