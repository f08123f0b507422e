"""Heat-map figures: overlay with colour bar and title, and a gallery of top and bottom patches.

Figures are drawn with matplotlib's object API on an Agg canvas, so no global pyplot state is
touched and nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from slidemil.atomic import atomic_path


def save_figure(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return Path(path)


def heatmap_title(slide_id: str, attrs: dict) -> str:
    """``<slide_id>: predicted <class> (p = 0.93), true <label>`` from an attention file's
    attributes; just the slide id when it records no prediction."""
    predicted = attrs.get("predicted")
    probabilities = attrs.get("probabilities")
    classes = attrs.get("class_names") or []
    if predicted is None or not probabilities or predicted not in classes:
        return slide_id
    probability = probabilities[classes.index(predicted)]
    title = f"{slide_id}: predicted {predicted} (p = {probability:.2f})"
    label = attrs.get("label")
    return f"{title}, true {label}" if label is not None else title


def heatmap_figure(
    image: np.ndarray, title: str, cmap: str = "jet", label: str = "attention (normalised)"
) -> Figure:
    """The overlay at its own pixel size (plus margins) with a colour bar and a title."""
    height, width = image.shape[:2]
    dpi = 100
    figure = Figure(figsize=(width / dpi + 1.4, height / dpi + 0.6), dpi=dpi)
    axes = figure.add_axes((0.0, 0.0, width / (width + 140), 1.0))
    axes.imshow(image, interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(title, fontsize=10)
    bar_axes = figure.add_axes((width / (width + 140) + 0.02, 0.1, 0.025, 0.8))
    figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=bar_axes, label=label)
    return figure


def gallery_figure(
    top: list[tuple[np.ndarray, float]],
    bottom: list[tuple[np.ndarray, float]],
    title: str,
) -> Figure:
    """Two rows of patches: highest attention first, then lowest, each with its score."""
    columns = max(len(top), len(bottom), 1)
    figure = Figure(figsize=(1.6 * columns, 3.9))
    figure.suptitle(title, fontsize=10)
    for row, (name, patches) in enumerate((("highest", top), ("lowest", bottom))):
        for column in range(columns):
            axes = figure.add_subplot(2, columns, row * columns + column + 1)
            axes.set_axis_off()
            if column < len(patches):
                pixels, score = patches[column]
                axes.imshow(pixels)
                axes.set_title(f"{name} {column + 1}\n{score:.3g}", fontsize=7)
    return figure
