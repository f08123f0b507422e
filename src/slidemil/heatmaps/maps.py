"""Which score maps a heat map draws from an attention file, and their scores.

The default map (``class_name=None``) is what a heat map always showed for attention files: the
softmax attention weights; for files whose per-class scores came from another method
(``--explain ig``) it is the predicted class's scores. ``class_name`` picks one class's scores,
``"predicted"`` each slide's predicted class, and ``"all"`` one map per class where the scores
are class-specific (a class-agnostic file has one map whatever the class). The choice is made
from the file's attributes alone, so finished outputs are found without reading the scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slidemil.errors import ArtifactError
from slidemil.formats.attention_file import AttentionMap

PREDICTED = "predicted"
ALL_CLASSES = "all"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ScoreMap:
    """One map of a slide: the stem of its output files and whose scores it shows."""

    stem: str  # <slide_id>, or <slide_id>_<class> for --class all
    class_name: str | None  # None: the attention weights (the default map of attention files)
    method: str  # "attention" or "ig"
    class_specific: bool

    @property
    def label(self) -> str:
        """What the colour bar shows."""
        if self.class_name is None:
            return "attention"
        if not self.class_specific:
            return f"{self.method} (class-agnostic)"
        return f"{self.method}: {self.class_name}"


def file_stem(slide_id: str, class_name: str) -> str:
    """``<slide_id>_<class>``, the class name made safe for a file name."""
    return f"{slide_id}_{_UNSAFE.sub('_', class_name).strip('_') or 'class'}"


def chosen_maps(
    attrs: dict, slide_id: str, class_name: str | None, path: str | Path | None = None
) -> list[ScoreMap]:
    """The maps to draw for ``class_name`` (see the module docstring) from an attention file's
    attributes; an :class:`ArtifactError` when the file lacks that class or per-class scores."""
    method = str(attrs.get("explanation") or "attention")
    has_class_scores = int(attrs.get("format_version") or 1) >= 2
    specific = has_class_scores and bool(attrs.get("class_specific"))
    names = [str(c) for c in attrs.get("class_names") or []]
    predicted = attrs.get("predicted")
    if class_name is None:
        if method == "attention" or not has_class_scores:
            return [ScoreMap(slide_id, None, method, specific)]
        class_name = PREDICTED
    if not has_class_scores:
        raise ArtifactError(
            path,
            f"holds no per-class scores (attention format {attrs.get('format_version') or 1}) "
            f"for --class {class_name}",
            "predict again with this slidemil, or leave out --class",
        )
    if not names:
        raise ArtifactError(path, f"records no class names for --class {class_name}")
    if class_name == ALL_CLASSES:
        if not specific:  # the same scores for every class: one map says it all
            return [ScoreMap(slide_id, str(predicted or names[0]), method, False)]
        return [ScoreMap(file_stem(slide_id, c), c, method, True) for c in names]
    if class_name == PREDICTED:
        if predicted not in names:
            raise ArtifactError(path, f"records no predicted class among {', '.join(names)}")
        class_name = str(predicted)
    if class_name not in names:
        raise ArtifactError(
            path,
            f"has no class {class_name!r}; its classes are {', '.join(names) or 'none'}",
            f"use --class with one of those, {PREDICTED!r} or {ALL_CLASSES!r}",
        )
    return [ScoreMap(slide_id, class_name, method, specific)]


def map_scores(
    attention: AttentionMap, score_map: ScoreMap, model: str
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) scores to draw and their raw counterpart, of ``model`` (a fold name or ``"mean"``).

    The default map: the softmax attention and the raw attention scores. A class's map: its
    per-class scores (both, since they are raw already)."""
    if score_map.class_name is None:
        return _attention_scores(attention, model)
    if model != "mean":
        _check_model(attention, model)
    scores = attention.class_score(score_map.class_name, model)
    return scores, scores


def _attention_scores(attention: AttentionMap, model: str) -> tuple[np.ndarray, np.ndarray]:
    """(N,) attention and raw scores of ``model``: one fold's columns, or the mean over all."""
    if model == "mean":
        return attention.mean_attention(), attention.attention_raw.mean(axis=1)
    column = _check_model(attention, model)
    return attention.attention[:, column], attention.attention_raw[:, column]


def _check_model(attention: AttentionMap, model: str) -> int:
    names = attention.attrs.get("models") or []
    if model not in names:
        raise ArtifactError(
            attention.path,
            f"no attention of model {model!r}; it has {', '.join(names) or 'none'}",
            "choose one of those with --model, or 'mean'",
        )
    return names.index(model)
