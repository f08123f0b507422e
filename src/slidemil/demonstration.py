"""``slidemil demo``: the whole pipeline on a synthetic cohort, as a new user first meets it.

synth -> patch -> extract -> train (k-fold) -> evaluate -> predict held-out slides -> heat maps,
then two numbers that say whether it worked: the balanced accuracy over folds and how well the
attention finds the lesions that decide each slide's class (AUC of attention against the
ground-truth lesion masks of the held-out slides).

Layout under the output folder::

    cohort/            the synthetic cohort (slides/, truth/, cohort.csv)
    cohort_train.csv   the slides used for training and cross-validation
    new_slides.csv     held-out patients' slides, predicted from the raw files
    work/              patches/, previews/, features/<encoder>/
    runs/demo/         folds, checkpoints, report/
    predictions/       predictions.csv, attention/
    heatmaps/          one figure, gallery and QuPath GeoJSON per held-out slide
    summary.json       the numbers printed at the end and where everything is

No pretrained weights can be assumed on a fresh machine, so the demo's encoder is ResNet18 with
seeded random weights (an explicit choice, printed at the start); with real slides use a
pretrained or pathology foundation-model encoder (docs/encoders.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from slidemil import atomic
from slidemil.config import StageConfig, build, write_resolved

if TYPE_CHECKING:
    import pandas as pd

CONFIG_NAME = "demo_config.yaml"


class DemoConfig(StageConfig):
    """Options of ``slidemil demo`` (the ``demo:`` section of a config file)."""

    slides: int = Field(104, ge=16, description="synthetic slides in the cohort")
    classes: int = Field(8, ge=2, le=8, description="classes (lesion kinds)")
    size: int = Field(3072, ge=1024, description="longer slide side in px at 0.5 µm/px")
    held_out: int = Field(1, ge=1, description="held-out patients per class, predicted at the end")
    folds: int = Field(3, ge=2, description="cross-validation folds")
    epochs: int = Field(40, ge=1, description="maximum training epochs per fold")
    encoder: str = Field("resnet18", description="patch encoder (see `slidemil encoders`)")
    weights: str = Field(
        "random", description="encoder weights: 'random' (seeded), a checkpoint file, or '' for "
        "the encoder's pretrained weights",
    )  # fmt: skip
    mpp: float = Field(1.0, gt=0, description="patch resolution in µm/px")
    patch_size: int = Field(128, ge=32, description="patch side in px")
    workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="parallel processes"
    )
    seed: int = Field(0, description="random seed of the cohort and the training")
    quiet: bool = Field(False, description="no progress bars (the final summary is still printed)")


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and the numbers it printed."""

    out: Path
    balanced_accuracy: tuple[float, float]  # mean, std over folds
    macro_auc: tuple[float, float]
    held_out_accuracy: float
    attention_auc: float  # attention vs lesion mask, mean over held-out slides
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)


def demo(out: str | Path = "demo", config: DemoConfig | None = None, **options: Any) -> DemoResult:
    """Run the whole pipeline on a synthetic cohort under ``out``; resumable like every stage."""
    import pandas as pd

    from slidemil.evaluation import evaluate
    from slidemil.extraction import extract
    from slidemil.heatmaps import heatmap
    from slidemil.patching import patch
    from slidemil.prediction import predict
    from slidemil.synthetic import synth
    from slidemil.training import train

    config = config or build(DemoConfig, section="demo", overrides=options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(out / CONFIG_NAME, {"demo": config})
    weights = config.weights or None
    _say(
        f"slidemil demo -> {out}: {config.slides} synthetic slides, {config.classes} classes; "
        f"encoder {config.encoder} with {config.weights or 'pretrained'} weights",
        config.quiet,
    )
    seconds: dict[str, float] = {}
    common = {"quiet": config.quiet}

    with _timed(seconds, "synth"):
        cohort = synth(
            out / "cohort", slides=config.slides, classes=config.classes, size=config.size,
            max_slides_per_patient=2, seed=config.seed, workers=config.workers, **common,
        )  # fmt: skip
        train_csv, new_csv = split_held_out(cohort.to_frame(), out, config.held_out, config.seed)
    with _timed(seconds, "patch"):
        patch(
            train_csv, out / "work", mpp=config.mpp, patch_size=config.patch_size,
            workers=config.workers, **common,
        )  # fmt: skip
    with _timed(seconds, "extract"):
        extract(
            out / "work", encoder=config.encoder, weights=weights, device="auto",
            batch_size=64, workers=max(1, config.workers - 1), **common,
        )  # fmt: skip
    run = out / "runs" / "demo"
    with _timed(seconds, "train"):
        train(
            out / "work", run, folds=config.folds, epochs=config.epochs, seed=config.seed,
            **common,
        )  # fmt: skip
    with _timed(seconds, "evaluate"):
        report = evaluate(run, quiet=config.quiet)
    with _timed(seconds, "predict"):
        predicted = predict(
            run, new_csv, out / "predictions", workers=max(1, config.workers - 1), **common
        )
    with _timed(seconds, "heatmap"):
        heatmap(out / "predictions", out / "heatmaps", workers=config.workers, **common)

    held_out = _held_out_accuracy(predicted.predictions, pd.read_csv(new_csv, dtype=str))
    attention_auc = lesion_auc(out / "predictions" / "attention", out / "cohort")
    result = DemoResult(
        out=out,
        balanced_accuracy=report.mean_std("balanced_accuracy"),
        macro_auc=report.mean_std("macro_auc"),
        held_out_accuracy=held_out,
        attention_auc=attention_auc,
        seconds=seconds,
        paths={
            "cohort": str(out / "cohort" / "cohort.csv"),
            "previews": str(out / "work" / "previews"),
            "features": str(out / "work" / "features"),
            "run": str(run),
            "report": str(report.out_dir),
            "predictions": str(out / "predictions" / "predictions.csv"),
            "heatmaps": str(out / "heatmaps"),
        },
    )
    atomic.write_text(out / "summary.json", json.dumps(_as_json(result), indent=2) + "\n")
    _say(summary_text(result, config))  # the point of the demo: shown even when quiet
    return result


def split_held_out(cohort: pd.DataFrame, out: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    """Set ``per_class`` patients of every class aside (all their slides) as new slides."""
    import numpy as np

    rng = np.random.default_rng(seed)
    held: list[str] = []
    for label in sorted(cohort["label"].unique()):
        patients = sorted(cohort.loc[cohort["label"] == label, "patient_id"].unique())
        held += list(rng.choice(patients, size=min(per_class, len(patients) - 1), replace=False))
    is_new = cohort["patient_id"].isin(held)
    columns = ["slide_id", "path", "label", "patient_id", "slide_mpp"]
    train_csv, new_csv = out / "cohort_train.csv", out / "new_slides.csv"
    atomic.write_csv(train_csv, cohort.loc[~is_new, columns])
    atomic.write_csv(new_csv, cohort.loc[is_new, columns])
    return train_csv, new_csv


def lesion_auc(attention_dir: Path, cohort_dir: Path) -> float:
    """Mean over slides of the AUC of attention for patches inside the true lesions."""
    import numpy as np

    from slidemil.formats.attention_file import read_attention_file
    from slidemil.heatmaps import localisation_auc, patch_mask_fraction
    from slidemil.synthetic import load_truth
    from slidemil.synthetic.scene import LABEL_LESION

    aucs = []
    for path in sorted(attention_dir.glob("*.h5")):
        attention = read_attention_file(path)
        scene = load_truth(cohort_dir, path.stem)
        downsample = max(1.0, attention.patch_size_level0 / 8)  # 8 mask px across a patch
        lesion = scene.label_map(downsample) == LABEL_LESION
        inside = patch_mask_fraction(
            attention.coords, attention.patch_size_level0, lesion, downsample
        )
        auc = localisation_auc(attention.mean_attention(), inside)
        if np.isfinite(auc):
            aucs.append(auc)
    return float(np.mean(aucs)) if aucs else float("nan")


def _held_out_accuracy(predictions: pd.DataFrame, truth: pd.DataFrame) -> float:
    labels = truth.set_index("slide_id")["label"]
    known = predictions[predictions["slide_id"].isin(labels.index)]
    if known.empty:
        return float("nan")
    return float((known["predicted"].to_numpy() == labels[known["slide_id"]].to_numpy()).mean())


def summary_text(result: DemoResult, config: DemoConfig) -> str:
    mean, std = result.balanced_accuracy
    auc_mean, auc_std = result.macro_auc
    chance = 1.0 / config.classes
    total = sum(result.seconds.values())
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    lines = [
        "",
        f"slidemil demo finished in {total / 60:.1f} min ({timings})",
        f"  balanced accuracy over {config.folds} folds: {mean:.3f} ± {std:.3f} "
        f"(chance {chance:.3f}); macro AUC {auc_mean:.3f} ± {auc_std:.3f}",
        f"  held-out slides predicted correctly: {result.held_out_accuracy:.0%}",
        "  attention finds the lesions: "
        + (
            f"AUC {result.attention_auc:.3f} (attention inside vs outside the true lesions; "
            "0.5 = chance)"
            if result.attention_auc == result.attention_auc  # not NaN
            else "not measurable (no patch lies mostly inside a lesion: slides too small)"
        ),
        "  outputs:",
        *(f"    {name:<12} {path}" for name, path in result.paths.items()),
        "  look at the slides and their attention in the browser:",
        f"    slidemil view {Path(result.paths['predictions']).parent}",
    ]
    return "\n".join(lines)


def _as_json(result: DemoResult) -> dict[str, Any]:
    return {
        "balanced_accuracy": {
            "mean": result.balanced_accuracy[0],
            "std": result.balanced_accuracy[1],
        },
        "macro_auc": {"mean": result.macro_auc[0], "std": result.macro_auc[1]},
        "held_out_accuracy": result.held_out_accuracy,
        "attention_lesion_auc": result.attention_auc,
        "seconds": result.seconds,
        "paths": result.paths,
    }


def _say(text: str, quiet: bool = False) -> None:
    from tqdm.auto import tqdm  # writes above any progress bar

    if not quiet:
        tqdm.write(text)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block as ``seconds[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 1)
