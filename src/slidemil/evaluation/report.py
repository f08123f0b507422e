"""``slidemil.evaluate``: read a training run, write its report folder, print mean ± std.

Reads ``<run>/run.json`` and each ``<run>/fold_<k>/predictions.csv`` (and ``history.csv`` for
the training curves); folds without predictions yet are reported as missing. Writes, under
``<run>/report/`` unless ``out`` says otherwise::

    metrics.csv            a row per fold, then mean and std rows
    per_class.csv          per fold and class: support, recall, precision, F1, AUC (+ mean, std)
    confusion_matrices.csv per fold and summed: true, predicted, count, row fraction
    predictions.csv        every fold's test predictions together (at the chosen level)
    confusion_matrix.png   summed over folds: counts and row-normalised
    roc.png                one-vs-rest ROC curves of all folds' predictions pooled
    training_curves.png    loss and a validation metric per epoch, per fold
    summary.json, summary.md   the mean ± std table, folds present and missing
    evaluate_config.yaml   the resolved options
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from slidemil import atomic
from slidemil.config import build, write_resolved
from slidemil.errors import ArtifactError
from slidemil.evaluation.config import CURVE_METRIC_PREFERENCE, EvaluateConfig

if TYPE_CHECKING:
    from slidemil.evaluation.metrics import ClassificationMetrics

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
CONFIG_NAME = "evaluate_config.yaml"
PROB_PREFIX = "prob_"


@dataclass(frozen=True)
class RunInfo:
    """What ``run.json`` says about a run, and which fold folders are expected."""

    run_dir: Path
    class_names: tuple[str, ...]
    expected_folds: tuple[int, ...]
    meta: dict[str, Any]

    def fold_dir(self, fold: int) -> Path:
        return self.run_dir / f"fold_{fold}"


@dataclass
class EvaluationReport:
    """The result of :func:`evaluate`; the same tables are in the files under ``out_dir``."""

    run_dir: Path
    out_dir: Path
    level: str
    class_names: tuple[str, ...]
    folds: tuple[int, ...]
    missing_folds: tuple[int, ...]
    fold_metrics: dict[int, ClassificationMetrics]
    summed_confusion: np.ndarray
    metrics: pd.DataFrame  # metrics.csv
    per_class: pd.DataFrame  # per_class.csv
    predictions: pd.DataFrame  # predictions.csv
    files: list[Path] = field(default_factory=list)

    def mean_std(self, metric: str) -> tuple[float, float]:
        """``(mean, std)`` over folds of a ``metrics.csv`` column, e.g. ``"macro_auc"``."""
        rows = self.metrics.set_index("fold")[metric]
        return float(rows["mean"]), float(rows["std"])


def evaluate(
    run_dir: str | Path,
    config: EvaluateConfig | None = None,
    *,
    config_file: str | Path | None = None,
    **options: Any,
) -> EvaluationReport:
    """Evaluate a training run: per-fold and mean ± std metrics, report files and plots.

    Options are :class:`EvaluateConfig` fields, e.g. ``evaluate("runs/exp1", level="patient")``;
    ``config_file`` is a YAML file whose ``evaluate`` section gives defaults.
    """
    from slidemil.evaluation.metrics import compute_metrics

    config = config or build(
        EvaluateConfig, section="evaluate", config_file=config_file, overrides=options
    )
    run = read_run(run_dir)
    out_dir = Path(config.out) if config.out is not None else run.run_dir / REPORT_DIR

    predictions, missing = _read_all_predictions(run)
    if config.level == "patient":
        predictions = aggregate_patients(predictions, run.class_names, run.run_dir)
    folds = tuple(sorted(int(f) for f in predictions["fold"].unique()))
    if missing:
        logger.warning(
            "%s: fold(s) %s have no predictions.csv yet; reporting fold(s) %s",
            run.run_dir, ", ".join(map(str, missing)), ", ".join(map(str, folds)),
        )  # fmt: skip

    prob_columns = probability_columns(run.class_names)
    fold_metrics = {}
    for fold in folds:
        part = predictions[predictions["fold"] == fold]
        fold_metrics[fold] = compute_metrics(
            part["label_index"].to_numpy(),
            part[prob_columns].to_numpy(),
            run.class_names,
            source=f"{run.run_dir} fold {fold}",
        )
    summed_confusion = sum(m.confusion for m in fold_metrics.values())

    report = EvaluationReport(
        run_dir=run.run_dir,
        out_dir=out_dir,
        level=config.level,
        class_names=run.class_names,
        folds=folds,
        missing_folds=missing,
        fold_metrics=fold_metrics,
        summed_confusion=summed_confusion,
        metrics=metrics_table(fold_metrics),
        per_class=per_class_table(fold_metrics),
        predictions=predictions,
    )
    _write_tables(report, run)
    write_resolved(out_dir / CONFIG_NAME, {"evaluate": config})
    report.files.append(out_dir / CONFIG_NAME)
    if config.plots:
        _write_plots(report, run, config.curve_metric)
    if not config.quiet:
        print_table(report)
    return report


# --- reading a run -------------------------------------------------------------------------------


def read_run(run_dir: str | Path) -> RunInfo:
    """Read ``run.json``; raise :class:`ArtifactError` naming the folder if it is not a run."""
    run_dir = Path(run_dir)
    fix = "pass the folder written by `slidemil train --out`"
    if not run_dir.is_dir():
        raise ArtifactError(run_dir, "not a folder", fix)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise ArtifactError(run_dir, "not a slidemil run (no run.json)", fix)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(meta_path, f"not valid JSON: {e}") from e
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) != len(names):
        raise ArtifactError(meta_path, "'class_names' must list at least 2 distinct names")
    folds = meta.get("folds")
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        raise ArtifactError(meta_path, f"'folds' must be a positive integer, got {folds!r}")
    return RunInfo(run_dir, tuple(map(str, names)), _expected_folds(run_dir, folds), meta)


def _expected_folds(run_dir: Path, folds: int) -> tuple[int, ...]:
    """Fold folders are numbered from 0 (``fold_0`` ... ``fold_<K-1>``); accept 1-based
    numbering when the folders on disk show it (``fold_<K>`` present, ``fold_0`` absent)."""
    one_based = (run_dir / f"fold_{folds}").is_dir() and not (run_dir / "fold_0").is_dir()
    start = 1 if one_based else 0
    return tuple(range(start, start + folds))


def probability_columns(class_names: tuple[str, ...]) -> list[str]:
    return [f"{PROB_PREFIX}{name}" for name in class_names]


def _read_all_predictions(run: RunInfo) -> tuple[pd.DataFrame, tuple[int, ...]]:
    frames, missing = [], []
    for fold in run.expected_folds:
        path = run.fold_dir(fold) / "predictions.csv"
        if path.is_file():
            frames.append(read_fold_predictions(path, run.class_names, fold))
        else:
            missing.append(fold)
    if not frames:
        raise ArtifactError(
            run.run_dir,
            f"no fold has predictions.csv yet (expected fold_{run.expected_folds[0]}/"
            "predictions.csv ...)",
            "wait for training to finish a fold",
        )
    return pd.concat(frames, ignore_index=True), tuple(missing)


def read_fold_predictions(path: Path, class_names: tuple[str, ...], fold: int) -> pd.DataFrame:
    """One fold's ``predictions.csv`` as ``slide_id, patient_id, label, label_index, fold,
    prob_<class>...``, checked against the run's class names."""
    try:
        frame = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArtifactError(path, f"not a readable CSV: {e}") from e
    prob_columns = probability_columns(class_names)
    needed = ["slide_id", *prob_columns]
    lacking = [c for c in needed if c not in frame.columns]
    if "label" not in frame.columns and "label_index" not in frame.columns:
        lacking.append("label")
    if lacking:
        raise ArtifactError(path, f"missing column(s) {', '.join(lacking)}")
    if frame.empty:
        raise ArtifactError(path, "has no predictions", "rerun this fold's training")
    if "label" in frame.columns:
        index_of = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(frame["label"]) - set(index_of))
        if unknown:
            raise ArtifactError(
                path, f"label(s) {', '.join(map(str, unknown[:5]))} not in run.json class_names"
            )
        label_index = frame["label"].map(index_of).astype(np.int64)
        if "label_index" in frame.columns and (label_index != frame["label_index"]).any():
            raise ArtifactError(path, "label and label_index disagree with run.json class_names")
    else:
        label_index = pd.to_numeric(frame["label_index"], errors="coerce")
        if label_index.isna().any() or not label_index.between(0, len(class_names) - 1).all():
            raise ArtifactError(path, f"label_index must be in 0..{len(class_names) - 1}")
        label_index = label_index.astype(np.int64)
    probs = frame[prob_columns].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(probs.to_numpy()).all():
        raise ArtifactError(path, "probability columns hold empty or non-numeric values")
    patient = frame["patient_id"] if "patient_id" in frame.columns else frame["slide_id"]
    return pd.DataFrame(
        {
            "slide_id": frame["slide_id"].astype(str),
            "patient_id": patient.astype(str),
            "label": [class_names[i] for i in label_index],
            "label_index": label_index.to_numpy(),
            "fold": fold,
            **{c: probs[c].to_numpy(dtype=np.float64) for c in prob_columns},
        }
    )


def aggregate_patients(
    predictions: pd.DataFrame, class_names: tuple[str, ...], run_dir: Path
) -> pd.DataFrame:
    """One row per patient and fold: the mean of the patient's slide probabilities.

    ``slide_id`` becomes the patient's slide ids joined by ``;`` and ``n_slides`` counts them.
    A patient whose slides carry different labels cannot be evaluated per patient.
    """
    prob_columns = probability_columns(class_names)
    groups = predictions.groupby(["fold", "patient_id"], sort=True)
    labels_per_patient = groups["label_index"].nunique()
    mixed = labels_per_patient[labels_per_patient > 1]
    if len(mixed):
        names = ", ".join(str(p) for _, p in mixed.index[:5])
        raise ArtifactError(
            run_dir,
            f"patient(s) {names} have slides with different labels",
            "evaluate with --level slide",
        )
    patients = groups.agg(
        slide_id=("slide_id", ";".join),
        n_slides=("slide_id", "size"),
        label_index=("label_index", "first"),
        **{c: (c, "mean") for c in prob_columns},
    ).reset_index()
    patients["label"] = [class_names[i] for i in patients["label_index"]]
    columns = ["slide_id", "patient_id", "n_slides", "label", "label_index", "fold", *prob_columns]
    return patients[columns]


# --- tables --------------------------------------------------------------------------------------


def metrics_table(fold_metrics: dict[int, ClassificationMetrics]) -> pd.DataFrame:
    """A row per fold (``n``, the summary metrics, ``recall_<class>``, ``auc_<class>``), then
    ``mean`` and ``std`` rows over folds (std with ddof=1; NaN values are skipped)."""
    rows = [{"fold": str(fold), "n": m.n, **m.scalars()} for fold, m in fold_metrics.items()]
    frame = pd.DataFrame(rows)
    values = frame.drop(columns="fold")
    mean = {"fold": "mean", **values.mean(skipna=True).to_dict()}
    std = {"fold": "std", **values.std(skipna=True, ddof=1).to_dict()}
    return pd.concat([frame, pd.DataFrame([mean, std])], ignore_index=True)


def per_class_table(fold_metrics: dict[int, ClassificationMetrics]) -> pd.DataFrame:
    """Per fold and class: support, recall, precision, f1, auc; then mean and std per class."""
    parts = []
    for fold, m in fold_metrics.items():
        part = m.per_class_frame()
        part.insert(0, "fold", str(fold))
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    grouped = frame.drop(columns="fold").groupby("class", sort=False)
    mean = grouped.mean().reset_index().assign(fold="mean")
    std = grouped.std(ddof=1).reset_index().assign(fold="std")
    return pd.concat([frame, mean[frame.columns], std[frame.columns]], ignore_index=True)


def confusion_table(report: EvaluationReport) -> pd.DataFrame:
    """Long format, per fold and ``sum``: fold, true, predicted, count, row_fraction."""
    matrices = {str(f): m.confusion for f, m in report.fold_metrics.items()}
    matrices["sum"] = report.summed_confusion
    rows = []
    for fold, counts in matrices.items():
        totals = counts.sum(axis=1)
        for (t, p), count in np.ndenumerate(counts):
            fraction = count / totals[t] if totals[t] else float("nan")
            rows.append((fold, report.class_names[t], report.class_names[p], int(count), fraction))
    return pd.DataFrame(rows, columns=["fold", "true", "predicted", "count", "row_fraction"])


def format_mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def summary_rows(report: EvaluationReport) -> list[dict[str, Any]]:
    """The summary metrics, then per-class recall and AUC: mean, std and per-fold values."""
    from slidemil.evaluation.metrics import SCALAR_METRICS

    table = report.metrics.set_index("fold")
    names = [*SCALAR_METRICS]
    names += [f"recall_{c}" for c in report.class_names]
    names += [f"auc_{c}" for c in report.class_names]
    rows = []
    for name in names:
        mean, std = float(table.at["mean", name]), float(table.at["std", name])
        rows.append(
            {
                "metric": name,
                "mean": _json_number(mean),
                "std": _json_number(std),
                "folds": {
                    str(f): _json_number(float(table.at[str(f), name])) for f in report.folds
                },
            }
        )
    return rows


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


# --- writing -------------------------------------------------------------------------------------


def _write_tables(report: EvaluationReport, run: RunInfo) -> None:
    out = report.out_dir
    predictions = report.predictions.copy()
    prob_columns = probability_columns(report.class_names)
    predictions["predicted"] = [
        report.class_names[i] for i in predictions[prob_columns].to_numpy().argmax(axis=1)
    ]
    tables = {
        "metrics.csv": report.metrics,
        "per_class.csv": report.per_class,
        "confusion_matrices.csv": confusion_table(report),
        "predictions.csv": predictions,
    }
    for name, frame in tables.items():
        atomic.write_csv(out / name, frame)
        report.files.append(out / name)

    rows = summary_rows(report)
    summary = {
        "run": str(run.run_dir),
        "level": report.level,
        "class_names": list(report.class_names),
        "folds": list(report.folds),
        "missing_folds": list(report.missing_folds),
        "n_evaluated": len(report.predictions),
        "metrics": rows,
    }
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic.write_text(out / "summary.md", _summary_markdown(report, run, rows))
    report.files += [out / "summary.json", out / "summary.md"]


def _summary_markdown(report: EvaluationReport, run: RunInfo, rows: list[dict]) -> str:
    folds = [str(f) for f in report.folds]
    lines = [
        f"# Evaluation of {run.run_dir.name}",
        "",
        f"- level: {report.level} ({len(report.predictions)} evaluated)",
        f"- folds reported: {', '.join(folds)}",
        f"- folds missing: {', '.join(map(str, report.missing_folds)) or 'none'}",
        f"- classes: {', '.join(report.class_names)}",
        "",
        "| metric | mean ± std | " + " | ".join(f"fold {f}" for f in folds) + " |",
        "|---|---|" + "---|" * len(folds),
    ]
    for row in rows:
        mean, std = (math.nan if v is None else v for v in (row["mean"], row["std"]))
        per_fold = ["n/a" if v is None else f"{v:.3f}" for v in row["folds"].values()]
        lines.append(f"| {row['metric']} | {format_mean_std(mean, std)} | {' | '.join(per_fold)} |")
    return "\n".join(lines) + "\n"


def _write_plots(report: EvaluationReport, run: RunInfo, curve_metric: str | None) -> None:
    from slidemil.evaluation.metrics import roc_curves
    from slidemil.evaluation.plots import plot_confusion, plot_roc, plot_training_curves

    out = report.out_dir
    folds = ", ".join(map(str, report.folds))
    plot_confusion(
        out / "confusion_matrix.png",
        report.summed_confusion,
        report.class_names,
        title=f"{run.run_dir.name}: summed over folds {folds} ({report.level} level)",
    )
    prob_columns = probability_columns(report.class_names)
    curves = roc_curves(
        report.predictions["label_index"].to_numpy(),
        report.predictions[prob_columns].to_numpy(),
        report.class_names,
    )
    plot_roc(out / "roc.png", curves, title=f"{run.run_dir.name}: ROC, folds {folds} pooled")
    report.files += [out / "confusion_matrix.png", out / "roc.png"]

    histories = {}
    for fold in run.expected_folds:  # a fold still training has curves too
        path = run.fold_dir(fold) / "history.csv"
        if path.is_file():
            try:
                histories[f"fold {fold}"] = pd.read_csv(path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
                logger.warning("%s: unreadable, left out of training_curves.png (%s)", path, e)
    if not histories:
        logger.warning("%s: no history.csv in any fold; no training_curves.png", run.run_dir)
        return
    metric = curve_metric or _default_curve_metric(histories.values())
    plot_training_curves(out / "training_curves.png", histories, metric)
    report.files.append(out / "training_curves.png")


def _default_curve_metric(histories) -> str | None:
    columns = {c for h in histories for c in h.columns}
    for name in CURVE_METRIC_PREFERENCE:
        if name in columns:
            return name
    others = sorted(c for c in columns if c.startswith("val_") and c != "val_loss")
    return others[0] if others else None


def print_table(report: EvaluationReport) -> None:
    """The mean ± std table (and per-fold values) in the terminal."""
    from rich.console import Console
    from rich.table import Table

    title = f"{report.run_dir.name}: {report.level} level, folds " + ", ".join(
        map(str, report.folds)
    )
    if report.missing_folds:
        title += f" (missing: {', '.join(map(str, report.missing_folds))})"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    for fold in report.folds:
        table.add_column(f"fold {fold}", justify="right")
    for row in summary_rows(report):
        mean, std = (math.nan if v is None else v for v in (row["mean"], row["std"]))
        per_fold = ["n/a" if v is None else f"{v:.3f}" for v in row["folds"].values()]
        table.add_row(row["metric"], format_mean_std(mean, std), *per_fold)
    console = Console()
    console.print(table)
    console.print(f"report: {report.out_dir}")
