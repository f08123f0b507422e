"""``slidemil patch`` against CLAM's own ``create_patches_fp.py``: whole-process wall time.

    git clone https://github.com/mahmoodlab/CLAM /tmp/CLAM     # nothing of it is committed here
    python benchmarks/patch_vs_clam.py --clam /tmp/CLAM

Both tools segment, patch and draw their picture of every slide of one synthetic cohort (8
slides of 8192 px, half at 0.25 and half at 0.5 µm/px, cached in ``--cache``), one process each,
one thread (``OMP_NUM_THREADS=1``): CLAM with ``--seg --patch --stitch`` and its default
parameters (256 px patches of level 0, whatever the slide's resolution) except its area limits,
which a process list sets per slide to slidemil's (10,000 µm² of tissue, 2,000 µm² holes; CLAM's
default of 100 reference patches of 512² level-0 px drops every piece of tissue on slides this
small), slidemil with
``--mpp 0.5 --patch-size 256 --workers 1`` and each reader. A figure is the wall time of the
whole process, interpreter start and imports included, with its peak RSS; the runs of the tools
are interleaved so a busy machine slows them alike. CLAM needs its own dependencies (OpenSlide,
OpenCV, h5py, pandas, PIL) in the interpreter given by ``--python``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from slidemil.slide import Slide
from slidemil.synthetic import synth


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of ``command``; a failure stops the benchmark."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(command)} failed:\n{tail}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def clam_process_list(cohort: Path, save_dir: Path) -> str:
    """CLAM's per-slide parameter table with its area limits in its own unit (512² level-0 px),
    set to slidemil's defaults in µm²; returns its name inside ``save_dir``, as CLAM wants it."""
    from slidemil.patching import PatchConfig

    defaults = PatchConfig()
    lines = ["slide_id,process,a_t,a_h"]
    for path in sorted((cohort / "slides").iterdir()):
        with Slide(path) as slide:
            reference_um2 = (512 * slide.mpp) ** 2
        lines.append(f"{path.name},1,{defaults.min_tissue_area_um2 / reference_um2:.6g},"
                     f"{defaults.min_hole_area_um2 / reference_um2:.6g}")  # fmt: skip
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "process_list.csv").write_text("\n".join(lines) + "\n")
    return "process_list.csv"


def patch_count(folder: Path) -> int:
    total = 0
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as f:
            total += int(f["coords"].shape[0])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clam", type=Path, required=True, help="a checkout of mahmoodlab/CLAM")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run CLAM with")
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=8192, help="longer side, level-0 px")
    parser.add_argument("--slide-mpp", type=float, nargs="+", default=[0.25, 0.5],
                        help="level-0 µm/px of the slides, in turn (0.5 alone: CLAM's level-0 "
                        "patches are then the same 128 µm as slidemil's)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slidemil-bench"))
    args = parser.parse_args()
    script = args.clam / "create_patches_fp.py"
    if not script.is_file():
        raise SystemExit(f"{script}: not found; --clam must be a checkout of mahmoodlab/CLAM")
    resolutions = " and ".join(f"{mpp:g}" for mpp in args.slide_mpp)
    cohort = args.cache / f"cohort_{args.slides}x{args.size}"
    if args.slide_mpp != [0.25, 0.5]:  # the default is read_throughput.py's cohort
        cohort = cohort.with_name(f"{cohort.name}_{resolutions.replace(' and ', '_')}mpp")
    synth(cohort, slides=args.slides, classes=2, size=args.size, mpp=args.slide_mpp, seed=11,
          quiet=True)  # fmt: skip
    outputs = args.cache / "patch_vs_clam"
    slidemil = [sys.executable, "-m", "slidemil", "patch", str(cohort / "cohort.csv"),
                "--mpp", "0.5", "--patch-size", "256", "--workers", "1", "--quiet"]  # fmt: skip
    tools = {
        "CLAM `create_patches_fp.py`": (
            [
                args.python,
                str(script),
                "--source",
                str(cohort / "slides"),
                "--save_dir",
                str(outputs / "clam"),
                "--patch_size",
                "256",
                "--seg",
                "--patch",
                "--stitch",
                "--process_list",
                "process_list.csv",
            ],
            args.clam,
            outputs / "clam",
            outputs / "clam" / "patches",
        ),
        **{
            f"`slidemil patch --reader {reader}`": (
                [*slidemil, "--out", str(outputs / reader), "--reader", reader],
                Path.cwd(),
                outputs / reader,
                outputs / reader / "patches",
            )
            for reader in ("openslide", "tiles")
        },
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
    clam_name = next(iter(tools))
    for _ in range(args.repeats):
        for name, (command, cwd, out, _) in tools.items():
            shutil.rmtree(out, ignore_errors=True)
            if name == clam_name:
                clam_process_list(cohort, out)
            runs[name].append(timed(command, cwd))
    clam_wall = statistics.median(wall for wall, _ in runs[clam_name])
    print(f"{args.slides} slides of {args.size} px at {resolutions} µm/px, one process each, "
          f"{args.repeats} runs")  # fmt: skip
    print("| tool | wall time, median (min–max) | CLAM / tool | peak RSS | patches |")
    print("|---|---|---|---|---|")
    for name, (_, _, _, patches) in tools.items():
        walls = [wall for wall, _ in runs[name]]
        wall = statistics.median(walls)
        rss = max(peak for _, peak in runs[name])
        print(f"| {name} | {wall:.2f} s ({min(walls):.2f}–{max(walls):.2f}) | "
              f"{clam_wall / wall:.2f}× | {rss:.0f} MiB | {patch_count(patches)} |")  # fmt: skip


if __name__ == "__main__":
    main()
