"""Every registered MIL model on the demo's 8-class synthetic cohort: accuracy, whether its
explanations find the lesions, and training time per epoch.

    python benchmarks/models.py --out /tmp/slidemil-bench/models                # every model
    python benchmarks/models.py --out /tmp/slidemil-bench/models --models abmil-gated dsmil
    python benchmarks/models.py --out /tmp/slidemil-bench/models --explain attention

The cohort and features are made once, as ``slidemil demo`` makes them (``DemoConfig``'s
defaults: 104 slides of 3,072 px, 8 classes, 128 px patches at 1 µm/px, ResNet18 with seeded random
weights), and shared by every model. Each model is trained with 3-fold cross-validation (seed 0:
the same splits and the same initial seed for every model; the demo's 40 epochs and its training
defaults otherwise). Figures per model:

- balanced accuracy of each fold's test part, mean ± std over the folds;
- attention-lesion AUC for each explanation method (``--explain``: ``attention``, the model's
  native scores; ``ig``, integrated gradients): every slide is explained out of fold, by the model
  of the fold whose test part it is in, and the scores of the slide's *true* class are compared
  with the ground-truth lesion masks (ROC AUC of patches inside vs outside the lesions, the demo's
  measure); the mean over each fold's slides with patches on both sides, then mean ± std over
  the folds;
- training seconds per epoch (median over every epoch of every fold, validation included).

Every stage skips finished work, so an interrupted run resumes; results go to
``<out>/models.json`` (with every slide's AUC) and a Markdown table to ``<out>/models.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FOLDS = 3
SEED = 0


def make_features(root: Path, workers: int) -> tuple[Path, Path]:
    """synth -> patch -> extract under ``root`` with the demo's settings; (work, cohort dir)."""
    from slidemil.demonstration import DemoConfig
    from slidemil.extraction import extract
    from slidemil.patching import patch
    from slidemil.synthetic import synth

    demo = DemoConfig(workers=workers, quiet=True)
    cohort = root / "cohort"
    synth(cohort, slides=demo.slides, classes=demo.classes, size=demo.size,
          max_slides_per_patient=2, seed=demo.seed, workers=workers, quiet=True)  # fmt: skip
    patch(cohort / "cohort.csv", root / "work", mpp=demo.mpp, patch_size=demo.patch_size,
          workers=workers, quiet=True)  # fmt: skip
    extract(root / "work", encoder=demo.encoder, weights=demo.weights, device="cpu",
            batch_size=64, workers=max(1, workers - 1), quiet=True)  # fmt: skip
    return root / "work", cohort


def train_model(work: Path, run: Path, model: str, epochs: int) -> dict[str, Any]:
    """3-fold run of ``model``; test balanced accuracy per fold and seconds per epoch."""
    from slidemil.training import train

    started = time.perf_counter()
    result = train(work, run, model=model, folds=FOLDS, epochs=epochs, seed=SEED, device="cpu",
                   quiet=True)  # fmt: skip
    wall = time.perf_counter() - started
    seconds = pd.concat(
        [pd.read_csv(run / f"fold_{k}" / "history.csv")["seconds"] for k in result.folds]
    )
    accuracy = [metrics["balanced_accuracy"] for metrics in result.folds.values()]
    return {
        "balanced_accuracy": accuracy,
        "seconds_per_epoch": float(seconds.median()),
        "epochs_trained": len(seconds),
        "train_wall_s": round(wall, 1),  # 0-ish when the run was already finished
    }


def explain_out_of_fold(
    run: Path, work: Path, cohort: Path, method: str, out: Path
) -> dict[int, list[float]]:
    """Predict every slide with the fold that tested it, explained by ``method``; per fold, the
    lesion AUC of each of its test slides' true-class scores (NaN where no patch lies mostly
    inside a lesion)."""
    from slidemil.prediction import predict

    splits = pd.read_csv(run / "splits.csv", dtype={"slide_id": str})
    slides = pd.read_csv(cohort / "cohort.csv", dtype=str)
    slides["path"] = [str(cohort / p) for p in slides["path"]]
    (features,) = [p for p in (work / "features").iterdir() if p.is_dir()]
    aucs: dict[int, list[float]] = {}
    for fold in sorted(splits["fold"].unique()):
        tested = splits.loc[(splits["fold"] == fold) & (splits["part"] == "test"), "slide_id"]
        folder = out / f"fold_{fold}"
        folder.mkdir(parents=True, exist_ok=True)
        csv = folder / "slides.csv"
        slides[slides["slide_id"].isin(tested)].to_csv(csv, index=False)
        predict(run, csv, folder, features=features, model=f"fold_{fold}", explain=method,
                device="cpu", workers=0, quiet=True)  # fmt: skip
        labels = dict(zip(slides["slide_id"], slides["label"], strict=True))
        files = sorted((folder / "attention").glob("*.h5"))
        aucs[int(fold)] = [lesion_auc(path, cohort, labels[path.stem]) for path in files]
    return aucs


def lesion_auc(attention_file: Path, cohort: Path, label: str) -> float:
    """AUC of the ``label`` class's scores for the patches inside the slide's true lesions."""
    from slidemil.formats.attention_file import read_attention_file
    from slidemil.heatmaps import localisation_auc, patch_mask_fraction
    from slidemil.synthetic import load_truth
    from slidemil.synthetic.scene import LABEL_LESION

    attention = read_attention_file(attention_file)
    scene = load_truth(cohort, attention_file.stem)
    downsample = max(1.0, attention.patch_size_level0 / 8)  # 8 mask px across a patch, as the demo
    lesion = scene.label_map(downsample) == LABEL_LESION
    inside = patch_mask_fraction(attention.coords, attention.patch_size_level0, lesion, downsample)
    return localisation_auc(attention.class_score(label), inside)


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std) of the finite values."""
    finite = np.asarray([v for v in values if np.isfinite(v)], float)
    if not len(finite):
        return "n/a"
    return f"{finite.mean():.3f} ± {finite.std(ddof=1) if len(finite) > 1 else 0.0:.3f}"


def fold_means(per_fold: dict[int, list[float]]) -> list[float]:
    """Each fold's mean over its measurable slides."""
    means = []
    for values in per_fold.values():
        finite = [v for v in values if np.isfinite(v)]
        means.append(float(np.mean(finite)) if finite else float("nan"))
    return means


def table(rows: list[dict[str, Any]], methods: list[str]) -> str:
    header = ["model", "balanced accuracy (3 folds)"]
    header += [f"lesion AUC, {m}" for m in methods] + ["s / epoch", "epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"`{row['model']}`", mean_std(row["balanced_accuracy"])]
        cells += [mean_std(fold_means(row[f"lesion_auc_{m}"])) for m in methods]
        cells += [f"{row['seconds_per_epoch']:.2f}", str(row["epochs_trained"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from slidemil import atomic
    from slidemil.explanation import EXPLAIN_METHODS
    from slidemil.models import list_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/slidemil-bench/models"))
    parser.add_argument("--models", nargs="+", default=None, help="default: every registered")
    parser.add_argument("--explain", nargs="+", default=list(EXPLAIN_METHODS),
                        choices=EXPLAIN_METHODS)  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's (40)")
    parser.add_argument("--workers", type=int, default=2, help="processes for synth and patch")
    args = parser.parse_args()

    from slidemil.demonstration import DemoConfig

    work, cohort = make_features(args.out, args.workers)
    epochs = args.epochs or DemoConfig(workers=1).epochs
    rows = []
    for model in args.models or list_models():
        run = args.out / "runs" / model
        row: dict[str, Any] = {"model": model, **train_model(work, run, model, epochs)}
        for method in args.explain:
            started = time.perf_counter()
            aucs = explain_out_of_fold(run, work, cohort, method, run / f"explain_{method}")
            row[f"lesion_auc_{method}"] = aucs
            row[f"lesion_slides_{method}"] = sum(np.isfinite(v).sum() for v in aucs.values())
            row[f"explain_{method}_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list | dict)},
                         default=float), flush=True)  # fmt: skip
        # after every model, so a long run shows its results as they come
        atomic.write_text(args.out / "models.json", json.dumps(rows, indent=1, default=float))
        atomic.write_text(args.out / "models.md", table(rows, args.explain) + "\n")
    print(table(rows, args.explain))


if __name__ == "__main__":
    main()
