"""Report figures as PNG: confusion matrices, ROC and precision-recall curves, reliability
diagrams, training curves.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
``pyplot``, so no global backend, figure registry or style is touched and nothing leaks between
calls. Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slidemil import atomic
from slidemil.evaluation.calibration import ReliabilityCurve
from slidemil.evaluation.metrics import normalise_rows

DPI = 120


def plot_confusion(
    path: str | Path, confusion: np.ndarray, class_names: Sequence[str], title: str = ""
) -> None:
    """Two panels: counts and row-normalised fractions (rows = true class)."""
    n = len(class_names)
    side = max(4.0, 0.55 * n + 2.5)
    fig = _figure((2 * side + 1.0, side))
    panels = (
        (np.asarray(confusion, dtype=np.float64), "counts", "{:.0f}"),
        (normalise_rows(confusion), "row-normalised (recall on the diagonal)", "{:.2f}"),
    )
    for i, (values, subtitle, fmt) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        shown = np.ma.masked_invalid(values)
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if i else None)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        finite_max = np.nanmax(values) if np.isfinite(values).any() else 1.0
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value) and n <= 16:
                dark = value > 0.6 * finite_max
                ax.text(col, row, fmt.format(value), ha="center", va="center",
                        fontsize=8, color="white" if dark else "black")  # fmt: skip
        ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(subtitle)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_roc(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    title: str = "",
    reference: Mapping[str, tuple[np.ndarray, np.ndarray, float]] | None = None,
    reference_label: str = "internal",
) -> None:
    """One-vs-rest ROC curves, one line per class with its AUC in the legend; ``reference``
    curves (e.g. the internal cross-validation's, next to an external cohort's) are dashed."""
    fig = _figure((6.5, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        ax.plot(fpr, tpr, color=f"C{i % 10}", linewidth=1.8, label=f"{name} (AUC {auc:.3f})")
        if reference and name in reference:
            r_fpr, r_tpr, r_auc = reference[name]
            ax.plot(r_fpr, r_tpr, color=f"C{i % 10}", linewidth=1.2, linestyle="--",
                    label=f"{name}, {reference_label} (AUC {r_auc:.3f})")  # fmt: skip
    _finish_curve_axes(
        ax, bool(curves), "false positive rate (1 - specificity)",
        "true positive rate (sensitivity)", "lower right", title or "ROC, one vs rest",
    )  # fmt: skip
    _save(fig, path)


def plot_precision_recall(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float, float]],
    title: str = "",
) -> None:
    """One-vs-rest precision-recall curves with their average precision (area under the
    curve); a dotted line per class at its prevalence, the precision of a no-skill model."""
    fig = _figure((6.5, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, (recall, precision, ap, prevalence)) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        ax.step(recall, precision, where="post", color=colour, linewidth=1.8,
                label=f"{name} (AP {ap:.3f})")  # fmt: skip
        ax.axhline(prevalence, color=colour, linestyle=":", linewidth=1)
    _finish_curve_axes(
        ax, bool(curves), "recall (sensitivity)", "precision (positive predictive value)",
        "lower left", title or "precision-recall, one vs rest (dotted: prevalence)",
    )  # fmt: skip
    _save(fig, path)


def _finish_curve_axes(ax, any_curve: bool, xlabel: str, ylabel: str, legend: str, title: str):
    """The unit square of a ROC or precision-recall plot, its labels, legend and title."""
    if not any_curve:
        ax.text(0.5, 0.5, "no class has both positive and negative examples", ha="center")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)
    ax.set_title(title)


def plot_reliability(
    path: str | Path, curves: Mapping[str, ReliabilityCurve], title: str, xlabel: str
) -> None:
    """Reliability diagram: observed frequency against mean predicted probability per
    equal-mass bin, one line per curve (e.g. before and after temperature scaling) with its
    ECE, and the diagonal of perfect calibration. Bins hold equal numbers of predictions, so
    the markers' spread along the x axis shows where the probabilities fall."""
    fig = _figure((6.0, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(curve.predicted, curve.observed, marker="o", color=f"C{i % 10}", linewidth=1.6,
                label=f"{name} (ECE {curve.ece:.3f}, {len(curve.count)} bins)")  # fmt: skip
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("observed frequency")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_training_curves(
    path: str | Path, histories: Mapping[str, pd.DataFrame], metric: str | None
) -> None:
    """Loss (train solid, validation dashed) and one validation metric per epoch, per fold.

    ``histories`` maps a fold name to its ``history.csv`` frame (``epoch`` column, plus
    ``train_loss``, ``val_loss`` and ``metric`` where present).
    """
    panels = 2 if metric else 1
    fig = _figure((6.0 * panels, 4.5))
    loss_ax = fig.add_subplot(1, panels, 1)
    metric_ax = fig.add_subplot(1, panels, 2) if metric else None
    colours = [f"C{i % 10}" for i in range(len(histories))]
    for colour, (fold, history) in zip(colours, histories.items(), strict=True):
        epoch = history["epoch"] if "epoch" in history else np.arange(len(history))
        if "train_loss" in history:
            loss_ax.plot(epoch, history["train_loss"], color=colour, label=f"{fold} train")
        if "val_loss" in history:
            loss_ax.plot(epoch, history["val_loss"], color=colour, linestyle="--",
                         label=f"{fold} validation")  # fmt: skip
        if metric_ax is not None and metric in history:
            metric_ax.plot(epoch, history[metric], color=colour, marker=".", label=fold)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    if metric_ax is not None:
        metric_ax.set_xlabel("epoch")
        metric_ax.set_ylabel(metric)
        metric_ax.set_title(metric.replace("_", " "))
        metric_ax.grid(alpha=0.3)
        metric_ax.legend(fontsize=7)
    _save(fig, path)


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
