"""A 20-trial hyperparameter sweep on a small synthetic cohort, end to end on the CPU.

    python benchmarks/sweep.py --out /tmp/slidemil-sweep-bench            # 48 slides, 20 trials
    python benchmarks/sweep.py --out /tmp/b --slides 96 --trials 50 --folds 5

Writes a synthetic cohort (real SVS files), patches it, extracts ResNet18 features with seeded
random weights (as ``slidemil demo`` does: no download), then runs ``slidemil.sweep`` with TPE
and median pruning over lr, weight decay, dropout, hidden size and the model, scored on the
validation parts of the outer folds. Finally it trains the default options and ``best.yaml`` on
the same outer folds and prints their test balanced accuracy (mean ± std over folds). Cohort and
features are written once and reused; the sweep folder is started afresh.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidemil.config import build
from slidemil.extraction import extract
from slidemil.patching import patch
from slidemil.synthetic import synth
from slidemil.training import TrainConfig, train
from slidemil.tuning import sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slides", type=int, default=48)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    seconds = {}

    started = time.perf_counter()
    if not (out / "work" / "features").is_dir():
        synth(out / "cohort", slides=args.slides, classes=args.classes, size=2048,
                       max_slides_per_patient=2, seed=0, workers=2, quiet=True)  # fmt: skip
        patch(
            out / "cohort" / "cohort.csv",
            out / "work",
            mpp=1.0,
            patch_size=128,
            workers=2,
            quiet=True,
        )
        extract(out / "work", encoder="resnet18", weights="random", device="cpu", batch_size=64,
                workers=1, quiet=True)  # fmt: skip
    seconds["cohort + patch + extract"] = time.perf_counter() - started

    fixed = {"folds": args.folds, "epochs": args.epochs, "device": "cpu", "patience": 8}
    space = {
        "sampler": "tpe", "seed": 0, "pruner": "median", "prune_every": 5, "startup_trials": 5,
        "params": {
            "lr": {"low": 1e-5, "high": 3e-3, "log": True},
            "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
            "dropout": {"low": 0.0, "high": 0.5},
            "hidden_dim": {"choices": [64, 128, 256]},
            "model": {"choices": ["abmil", "abmil-gated", "mean-mil"]},
            **fixed,
        },
    }  # fmt: skip
    shutil.rmtree(out / "sweep", ignore_errors=True)
    started = time.perf_counter()
    result = sweep(out / "work", space, out / "sweep", trials=args.trials, quiet=True)
    seconds["sweep"] = time.perf_counter() - started
    table = result.trials

    finals = {}
    for name, config in (
        ("default options", TrainConfig(**fixed)),
        ("best.yaml", build(TrainConfig, section="train", config_file=result.best_config)),
    ):
        shutil.rmtree(out / "final" / name, ignore_errors=True)
        started = time.perf_counter()
        folds = train(out / "work", out / "final" / name, config.model_copy(update={"quiet": True}))
        seconds[f"train {name} on the outer folds"] = time.perf_counter() - started
        values = [m["balanced_accuracy"] for m in folds.folds.values()]
        finals[name] = (float(np.mean(values)), float(np.std(values)))

    states = table["state"].value_counts().to_dict()
    done = table[table["state"] == "COMPLETE"]
    print(f"cohort: {args.slides} slides, {args.classes} classes, {args.folds} outer folds")
    print(f"trials: {states}; seconds per trial: median {table['seconds'].median():.1f}, "
          f"completed {done['seconds'].median():.1f}, pruned "
          f"{table.loc[table['state'] == 'PRUNED', 'seconds'].median():.1f}")  # fmt: skip
    print(f"best validation balanced accuracy: {result.best_value:.3f} with {result.best_params}")
    for name, (mean, std) in finals.items():
        print(f"test balanced accuracy, {name}: {mean:.3f} ± {std:.3f}")
    for name, value in seconds.items():
        print(f"{name}: {value:.0f} s")
    pd.set_option("display.width", 200)
    print(table.drop(columns=["folder", "error"]).to_string(index=False))


if __name__ == "__main__":
    main()
