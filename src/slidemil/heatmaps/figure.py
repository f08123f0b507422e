"""Heat-map figures: overlay with colour bar and title, and a gallery of top and bottom patches.

Figures are drawn with matplotlib's object API on an Agg canvas, so no global pyplot state is
touched and nothing needs a display; the overlay figure is assembled in numpy so its memory is
a few copies of the overlay whatever its size.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from slidemil.atomic import atomic_path

FIGURE_DPI = 100
TITLE_HEIGHT = 30  # px above the overlay
BAR_WIDTH = 140  # px right of the overlay, for the colour bar and its label


def save_figure(figure: Figure | np.ndarray, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure, or an RGB uint8 image (as :func:`heatmap_figure` makes), as
    PNG atomically."""
    with atomic_path(path) as tmp:
        if isinstance(figure, np.ndarray):
            if not cv2.imwrite(str(tmp), cv2.cvtColor(figure, cv2.COLOR_RGB2BGR)):
                raise OSError(f"{tmp}: cannot write PNG")
        else:
            FigureCanvasAgg(figure)
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
) -> np.ndarray:
    """RGB uint8 figure: the overlay at its own pixel size, a title above and a colour bar on the
    right.

    Only the title strip and the colour bar are drawn with matplotlib; the overlay is pasted in
    as it is, because matplotlib's image pipeline makes float copies of an image several times
    its size (about 500 MB for a 2048 px overlay).
    """
    height, width = image.shape[:2]
    strip = _render(width + BAR_WIDTH, TITLE_HEIGHT, lambda figure: _draw_title(figure, title))
    bar = _render(BAR_WIDTH, height, lambda figure: _draw_colour_bar(figure, cmap, label))
    out = np.full((TITLE_HEIGHT + height, width + BAR_WIDTH, 3), 255, np.uint8)
    out[:TITLE_HEIGHT] = strip
    out[TITLE_HEIGHT:, :width] = image[..., :3]
    out[TITLE_HEIGHT:, width:] = bar
    return out


def _render(width: int, height: int, draw) -> np.ndarray:
    """RGB uint8 (height, width) of a small matplotlib figure drawn by ``draw(figure)``."""
    figure = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    canvas = FigureCanvasAgg(figure)
    draw(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(pixels[:height, :width])


def _draw_title(figure: Figure, title: str) -> None:
    figure.text(0.5, 0.5, title, ha="center", va="center", fontsize=10)


def _draw_colour_bar(figure: Figure, cmap: str, label: str) -> None:
    axes = figure.add_axes((0.12, 0.1, 0.18, 0.8))
    figure.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=axes, label=label)


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
