"""Class imbalance and early stopping on synthetic cohorts: what each training policy gets.

    python benchmarks/train_imbalance.py --out /tmp/imbalance weights    # 2 classes, 10:1
    python benchmarks/train_imbalance.py --out /tmp/imbalance stopping   # 8 classes, small val
    python benchmarks/train_imbalance.py --out /tmp/imbalance stopping --seeds 0 1 2 3 4
    python benchmarks/train_imbalance.py --out /tmp/imbalance stopping-faint --seeds 0 1 2 3 4

Features are made once per cohort as ``slidemil demo`` makes them (``synth --imbalance``, patch at
1 µm/px in 128 px patches, ResNet18 with seeded random weights) and reused; then every policy is
trained with 3-fold cross-validation for each seed (the seed changes the splits, the initial
weights and the sampling). Each table row is the mean ± std over seeds of the 3-fold mean.

``weights`` compares no correction, class-weighted loss and class-balanced sampling on a 2-class
cohort where the rare class has one slide for every ten of the other: test balanced accuracy and
the rare class's recall. ``stopping`` compares early-stopping and checkpoint-selection policies
on an 8-class imbalanced cohort with validation parts of about 18 slides: test balanced accuracy,
the best epoch and the epochs trained.

The stopping policies are replayed rather than trained one by one: with a cosine schedule over
a fixed ``epochs``, early stopping changes only where a run ends, not what it learns, so each
(seed, fold) is trained once for all 50 epochs, one epoch per invocation (``epoch_budget=1``,
which resumes bit for bit), and the test part is predicted after every epoch. Each policy is then
run by slidemil's own :class:`~slidemil.training.loop.EarlyStopping` over the recorded
validation history, and gets the test metrics of the epoch it picks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

COHORTS = {
    "weights": {"slides": 88, "classes": 2, "imbalance": 10.0, "lesion_fraction": (0.01, 0.03)},
    "stopping": {"slides": 96, "classes": 8, "imbalance": 4.0},
    # the same with faint lesions: learning starts late, as on the cohort of issue 12
    "stopping-faint": {
        "slides": 96,
        "classes": 8,
        "imbalance": 4.0,
        "lesion_fraction": (0.01, 0.03),
    },
}
WEIGHT_POLICIES = {
    "no correction": {"class_weights": False, "sampler": "shuffle"},
    "class weights": {"class_weights": True, "sampler": "shuffle"},
    "balanced sampling": {"class_weights": False, "sampler": "balanced"},
}
# name -> EarlyStopping options (the old defaults first: patience 10 on the raw metric from epoch 0)
STOPPING_POLICIES = {
    "patience 10, min 0, raw (old defaults)": {"patience": 10, "min_epochs": 0, "smoothing": 1},
    "patience 10, min 20, raw": {"patience": 10, "min_epochs": 20, "smoothing": 1},
    "patience 20, min 20, raw": {"patience": 20, "min_epochs": 20, "smoothing": 1},
    "patience 10, min 20, smoothed 3": {"patience": 10, "min_epochs": 20, "smoothing": 3},
    "patience 20, min 20, smoothed 5": {"patience": 20, "min_epochs": 20, "smoothing": 5},
    "patience 20, min 10, smoothed 5": {"patience": 20, "min_epochs": 10, "smoothing": 5},
    "patience 20, min 30, smoothed 5": {"patience": 20, "min_epochs": 30, "smoothing": 5},
    "patience 10, min 40, smoothed 5": {"patience": 10, "min_epochs": 40, "smoothing": 5},
    "patience 20, min 20, smoothed 10": {"patience": 20, "min_epochs": 20, "smoothing": 10},
    "patience 10, min 0, smoothed 5": {"patience": 10, "min_epochs": 0, "smoothing": 5},
    "no stop, best smoothed 5": {"patience": None, "min_epochs": 0, "smoothing": 5},
    "val loss, patience 20, min 20 (CLAM-like)": {
        "patience": 20, "min_epochs": 20, "smoothing": 1, "monitor": "loss",
    },
    "val loss, patience 20, min 20, smoothed 5": {
        "patience": 20, "min_epochs": 20, "smoothing": 5, "monitor": "loss",
    },
    "last epoch (no selection)": {"patience": None, "min_epochs": 49, "smoothing": 1},
}  # fmt: skip
EPOCHS = 50


def make_features(root: Path, cohort: dict[str, Any], workers: int) -> Path:
    """synth -> patch -> extract under ``root`` (every stage skips finished slides)."""
    from slidemil.extraction import extract
    from slidemil.patching import patch
    from slidemil.synthetic import synth

    synth(root / "cohort", size=3072, max_slides_per_patient=2, seed=0, workers=workers,
          quiet=True, **cohort)  # fmt: skip
    patch(root / "cohort" / "cohort.csv", root / "work", mpp=1.0, patch_size=128,
          workers=workers, quiet=True)  # fmt: skip
    extract(root / "work", encoder="resnet18", weights="random", device="cpu", batch_size=64,
            workers=max(1, workers - 1), quiet=True)  # fmt: skip
    return root / "work"


def train_policy(work: Path, out: Path, seed: int, options: dict[str, Any]) -> pd.DataFrame:
    """One 3-fold run; a row per fold with its test metrics, best epoch and epochs trained."""
    from slidemil.training import train

    result = train(work, out, folds=3, val_fraction=0.3, epochs=50, seed=seed, device="cpu",
                   quiet=True, **options)  # fmt: skip
    rows = []
    for fold, metrics in result.folds.items():
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        rows.append({**metrics, "fold": fold, "epochs_trained": len(history)})
    return pd.DataFrame(rows)


def replay_history(work: Path, out: Path, seed: int) -> pd.DataFrame:
    """Train every fold of one 3-fold run to ``EPOCHS`` epochs, one epoch per call, and record
    each epoch's validation metrics and test metrics (a row per fold and epoch)."""
    from slidemil.training import train

    def epochs_done(fold: int) -> int:
        path = out / f"fold_{fold}" / "history.csv"
        return len(pd.read_csv(path)) if path.is_file() else 0

    tests: list[dict[str, Any]] = []
    finished = False
    while not finished:
        before = [epochs_done(k) for k in range(3)]
        result = train(work, out, folds=3, val_fraction=0.3, epochs=EPOCHS, seed=seed,
                       device="cpu", quiet=True, patience=0, min_epochs=0, smoothing=1,
                       epoch_budget=1)  # fmt: skip
        finished = result.finished
        trained = [k for k in range(3) if epochs_done(k) > before[k]]
        for fold in trained:  # the one epoch of this call
            tests.append({"fold": fold, **test_metrics(work, out / f"fold_{fold}")})
    frames = []
    test_frame = pd.DataFrame(tests)
    for fold, rows in test_frame.groupby("fold"):
        history = pd.read_csv(out / f"fold_{fold}" / "history.csv")
        rows = rows.reset_index(drop=True).drop(columns="fold").add_prefix("test_")
        frames.append(pd.concat([history, rows], axis=1).assign(fold=fold))
    return pd.concat(frames, ignore_index=True)


def test_metrics(work: Path, fold_dir: Path) -> dict[str, float]:
    """Test balanced accuracy and macro AUC of a fold's latest checkpoint."""
    import numpy as np
    import torch

    from slidemil.training import load_model_from_checkpoint
    from slidemil.training.bags import read_bag
    from slidemil.training.predictions import part_metrics

    model, state = load_model_from_checkpoint(fold_dir / "checkpoint_latest.pt")
    mean, std = (state["standardization"][k].numpy() for k in ("mean", "std"))
    labels = pd.read_csv(work / "cohort.csv", dtype=str).set_index("slide_id")["label"]
    names = state["class_names"]
    probabilities, truth = [], []
    for slide_id in state["split"]["test"]:
        path = work / "features" / state["encoder"] / f"{slide_id}.h5"
        bag = (read_bag(path).astype(np.float32) - mean) / std
        with torch.no_grad():
            logits = model(torch.from_numpy(bag)[None], torch.ones(1, len(bag), dtype=bool))[0]
        probabilities.append(torch.softmax(logits, 1)[0].numpy())
        truth.append(names.index(labels[slide_id]))
    metrics = part_metrics(np.asarray(truth), np.stack(probabilities), names, warn_absent=False)
    return {k: metrics[k] for k in ("balanced_accuracy", "macro_auc")}


def apply_policy(history: pd.DataFrame, options: dict[str, Any]) -> dict[str, float]:
    """What one fold gets under a stopping policy: the picked epoch's test metrics."""
    from slidemil.training.loop import EarlyStopping

    options = dict(options)
    monitor = options.pop("monitor", "balanced_accuracy")
    stopper = EarlyStopping(monitor != "loss", **options)
    trained = 0
    for row in history.itertuples():
        if stopper.should_stop:
            break
        stopper.update(getattr(row, f"val_{monitor}"), row.epoch, row.val_loss)
        trained += 1
    best = history.set_index("epoch").loc[stopper.best_epoch]
    return {
        "balanced_accuracy": best["test_balanced_accuracy"],
        "macro_auc": best["test_macro_auc"],
        "best_epoch": stopper.best_epoch,
        "epochs_trained": trained,
    }


def summarise(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean ± std over seeds of each seed's mean over folds."""
    per_seed = frame.groupby(["policy", "seed"], sort=False)[columns].mean()
    grouped = per_seed.groupby(level="policy", sort=False)
    mean, std = grouped.mean(), grouped.std(ddof=0)
    return pd.DataFrame(
        {c: [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[c], std[c], strict=True)] for c in columns},
        index=mean.index,
    )


def markdown(table: pd.DataFrame) -> str:
    """The table as a Markdown table (as docs/benchmarks.md shows it)."""
    header = ["policy", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(i), *row]) + " |" for i, row in zip(
        table.index, table.astype(str).to_numpy().tolist(), strict=True)]  # fmt: skip
    return "\n".join(lines)


def weight_study(work: Path, root: Path, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        for index, (name, options) in enumerate(WEIGHT_POLICIES.items()):
            began = time.perf_counter()
            folds = train_policy(work, root / "runs" / f"seed{seed}_policy{index}", seed, options)
            folds["policy"], folds["seed"] = name, seed
            rows.append(folds)
            print(f"seed {seed}, {name}: {time.perf_counter() - began:.0f} s, balanced accuracy "
                  f"{folds['balanced_accuracy'].mean():.3f}", flush=True)  # fmt: skip
    return pd.concat(rows, ignore_index=True)


def stopping_study(work: Path, root: Path, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        began = time.perf_counter()
        recorded = root / f"history_seed{seed}.csv"  # a finished replay is reused
        if recorded.is_file():
            history = pd.read_csv(recorded)
        else:
            history = replay_history(work, root / "runs" / f"seed{seed}", seed)
            history.to_csv(recorded, index=False)
        print(f"seed {seed}: 3 folds × {EPOCHS} epochs in {time.perf_counter() - began:.0f} s",
              flush=True)  # fmt: skip
        for name, options in STOPPING_POLICIES.items():
            for fold, fold_history in history.groupby("fold"):
                picked = apply_policy(fold_history.reset_index(drop=True), options)
                rows.append({"policy": name, "seed": seed, "fold": fold, **picked})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(COHORTS))
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    root = args.out / args.study
    started = time.perf_counter()
    work = make_features(root, COHORTS[args.study], args.workers)
    cohort = pd.read_csv(root / "cohort" / "cohort.csv")
    counts = cohort["label"].value_counts()
    print(f"features ready in {time.perf_counter() - started:.0f} s; slides per class: "
          f"{counts.sort_index().to_dict()}")  # fmt: skip
    rare = str(counts.idxmin())
    if args.study == "weights":
        frame = weight_study(work, root, args.seeds)
        frame["rare_recall"] = frame[f"recall_{rare}"]
        columns = ["balanced_accuracy", "rare_recall"]
    else:
        frame = stopping_study(work, root, args.seeds)
        columns = ["balanced_accuracy", "macro_auc", "best_epoch", "epochs_trained"]
    frame.to_csv(root / "results.csv", index=False)
    table = summarise(frame, columns)
    print(markdown(table))
    summary = {"seeds": args.seeds, "rare_class": rare, "table": table.to_dict()}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - started:.0f} s (chance: {1 / len(counts):.3f})")


if __name__ == "__main__":
    main()
