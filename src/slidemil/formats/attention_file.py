"""Attention files: ``attention/<slide_id>.h5``, where in a slide a model looked.

Layout (``format_version`` 2)::

    /coords          int64 (N, 2)    level-0 top-left x, y of each patch
    /attention       float32 (N, F)  attention weights, softmax-normalised over the bag, per model
                                     (F = 1 for one model, one column per fold for an ensemble)
    /attention_raw   float32 (N, F)  the model's scores before the softmax: they do not depend
                                     on the rest of the bag, so they compare across slides
                                     (ABMIL: attention logits; mean-mil: 0; max-mil: the number
                                     of hidden units whose maximum the patch holds)
    /class_scores    float32 (N, F, C)  version 2: the score of patch n for class c by model f,
                                     classes in ``class_names`` order, made by the method in
                                     ``explanation`` (``slidemil.explain``)
    root attrs:
        format_version, slidemil_version, slide_id, slide_path, label (or null)
        explanation         version 2: the method of /class_scores, "attention" (the models'
                            native scores) or "ig" (integrated gradients)
        class_specific      version 2: false when /class_scores is the same for every class
                            (a class-agnostic model's attention: /attention_raw repeated)
        explanation_settings JSON {baseline, steps} for "ig", {} for "attention"
        models              JSON list naming each column (e.g. ["fold_0", "fold_1"])
        class_names         JSON list, the run's class order
        probabilities       the slide's class probabilities (mean over the models)
        model_probabilities JSON {model: [probability per class]}
        predicted           predicted class name (highest mean probability)
        n_patches           N
        run, features       the training run and the feature file predicted from
        encoder, weights    the features' encoder and weights identity
        patch_size_level0   footprint of a patch in level-0 px (float): all a heat map needs;
                            null when the features came without a patch geometry (a CLAM
                            file predicted without --patches or --patch-size-level0)
        patch_size, read_level, read_size, target_downsample, step, target_mpp,
        magnification, slide_mpp, slide_dimensions      copied from the patch / feature file
        has_coords          false when the bag had no coordinates (a CLAM .pt file): the
                            coords are then zeros
        geometry_source     where the geometry came from ("feature file", "patch file <path>",
                            "patch_size_level0 option"), or null
        geometry_problem    why there is no geometry (null when there is one)

Version 1 files (no /class_scores; ``explanation`` reads as "attention", ``class_specific`` as
false) still read: :attr:`AttentionMap.class_scores` is then ``None``. ``/attention`` and
``/attention_raw`` mean the same in both versions, whatever the explanation method, so readers of
version 1 read version 2 files too. A file without a geometry still holds the prediction and the
scores; only its heat map fails (:meth:`AttentionMap.placement_problem` says why). The file is
written to a temp name and renamed, so a file at the final path is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidemil.atomic import atomic_path
from slidemil.errors import ArtifactError
from slidemil.formats.h5 import provenance, read_attr, read_root_attrs, write_attrs

ATTENTION_FORMAT_VERSION = 2
PLACEMENT_FIX = (
    "predict again into a new --out folder with --patches DIR, the slides' CLAM or TRIDENT patch "
    "files, or --patch-size-level0 PX, the patch footprint in level-0 px"
)


@dataclass
class AttentionMap:
    """A slide's patch coordinates, attention per model and the prediction they led to."""

    coords: np.ndarray  # int64 (N, 2)
    attention: np.ndarray  # float32 (N, F), normalised
    attention_raw: np.ndarray  # float32 (N, F)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the file it was read from, for errors
    class_scores: np.ndarray | None = None  # float32 (N, F, C); None in version 1 files

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def explanation(self) -> str:
        """The method that made :attr:`class_scores` ("attention" for version 1 files)."""
        return str(self.attrs.get("explanation") or "attention")

    @property
    def class_specific(self) -> bool:
        """True when :attr:`class_scores` differ between classes."""
        return self.class_scores is not None and bool(self.attrs.get("class_specific"))

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.attrs.get("class_names") or []]

    def class_score(self, class_name: str, model: str = "mean") -> np.ndarray:
        """(N,) scores of ``class_name`` by ``model`` (a name in ``models``, or ``"mean"`` over
        them); an :class:`ArtifactError` naming what the file has when it lacks either."""
        if self.class_scores is None:
            raise ArtifactError(
                self.path,
                f"holds no per-class scores (attention format {self.attrs.get('format_version')})",
                "predict again with this slidemil to get them",
            )
        names = self.class_names
        if class_name not in names:
            raise ArtifactError(
                self.path,
                f"has no class {class_name!r}; its classes are {', '.join(names) or 'none'}",
            )
        per_model = self.class_scores[:, :, names.index(class_name)]
        if model == "mean":
            return per_model.mean(axis=1)
        models = [str(m) for m in self.attrs.get("models") or []]
        if model not in models:
            raise ArtifactError(
                self.path, f"no scores of model {model!r}; it has {', '.join(models) or 'none'}"
            )
        return per_model[:, models.index(model)]

    @property
    def placement_problem(self) -> str | None:
        """Why the patches cannot be placed on the slide (no coordinates, no footprint), or
        None when they can."""
        no_coords = self.attrs.get("has_coords") is False
        if not no_coords and self.attrs.get("patch_size_level0") is not None:
            return None
        default = "no patch coordinates" if no_coords else "no patch_size_level0 attribute"
        return self.attrs.get("geometry_problem") or default

    def check_placeable(self) -> None:
        """Raise an :class:`ArtifactError` naming both ways to a geometry when the patches
        cannot be placed."""
        problem = self.placement_problem
        if problem is not None:
            raise ArtifactError(self.path, f"cannot place the patches: {problem}", PLACEMENT_FIX)

    @property
    def patch_size_level0(self) -> float:
        """Patch footprint in level-0 px (an ArtifactError when the file has none)."""
        self.check_placeable()
        return float(self.attrs["patch_size_level0"])

    def mean_attention(self) -> np.ndarray:
        """(N,) attention averaged over models (each column sums to 1, so the mean does too)."""
        return self.attention.mean(axis=1)


def write_attention_file(path: str | Path, attention: AttentionMap) -> Path:
    path = Path(path)
    coords = np.asarray(attention.coords, np.int64).reshape(-1, 2)
    normalised = _as_columns(attention.attention, len(coords), "attention")
    raw = _as_columns(attention.attention_raw, len(coords), "attention_raw")
    per_class = _class_scores(attention, raw)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=coords)
        f.create_dataset("attention", data=normalised)
        f.create_dataset("attention_raw", data=raw)
        f.create_dataset("class_scores", data=per_class)
        # repeated raw scores are class-agnostic whatever the attributes say; given scores are
        # what the writer says, or whether they differ between classes when it says nothing
        differ = bool((per_class != per_class[:, :, :1]).any())
        given = attention.class_scores is not None
        specific = given and bool(attention.attrs.get("class_specific", differ))
        write_attrs(
            f.attrs,
            {
                "format_version": ATTENTION_FORMAT_VERSION,
                **provenance(),
                "explanation": "attention",
                "explanation_settings": {},
                **attention.attrs,
                "class_specific": specific,
            },
        )
    return path


def _class_scores(attention: AttentionMap, raw: np.ndarray) -> np.ndarray:
    """(N, F, C) per-class scores: the map's own, or the raw scores repeated for each class
    (class-agnostic) when it has none."""
    n_classes = max(1, len(attention.attrs.get("class_names") or []))
    if attention.class_scores is None:
        return np.repeat(raw[:, :, None], n_classes, axis=2)
    values = np.asarray(attention.class_scores, np.float32)
    if values.ndim != 3 or values.shape[:2] != raw.shape:
        raise ValueError(
            f"class_scores must be (N, F, C) with (N, F)={raw.shape}, got {values.shape}"
        )
    return values


def _as_columns(values: np.ndarray, rows: int, name: str) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] != rows:
        raise ValueError(f"{name} must be (N,) or (N, F) with N={rows}, got {values.shape}")
    return values


def read_attention_file(path: str | Path) -> AttentionMap:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "attention file not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("coords", "attention") if k not in f]
            if missing:
                raise ArtifactError(path, f"no {', '.join(missing)} dataset: not an attention file")
            coords = np.asarray(f["coords"][:], np.int64).reshape(-1, 2)
            attention = _as_columns(f["attention"][:], len(coords), "attention")
            raw = f["attention_raw"][:] if "attention_raw" in f else attention
            raw = _as_columns(raw, len(coords), "attention_raw")
            per_class = None
            if "class_scores" in f:
                per_class = np.asarray(f["class_scores"][:], np.float32)
                if per_class.ndim != 3 or per_class.shape[:2] != raw.shape:
                    raise ArtifactError(
                        path, f"class_scores {per_class.shape} do not match attention {raw.shape}"
                    )
            attrs = {k: read_attr(f.attrs, k) for k in f.attrs}
    except ArtifactError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(path, f"unreadable or truncated attention file: {e}") from e
    version = attrs.get("format_version")
    if version is not None and int(version) > ATTENTION_FORMAT_VERSION:
        raise ArtifactError(
            path,
            f"attention format {version} is newer than this slidemil reads "
            f"({ATTENTION_FORMAT_VERSION})",
            "upgrade slidemil",
        )
    return AttentionMap(coords, attention, raw, attrs, path, per_class)


def read_attention_attrs(path: str | Path) -> dict[str, Any]:
    """Only the attributes (cheap: no dataset is read)."""
    return read_root_attrs(path, "attention")


def is_complete_attention_file(path: str | Path) -> bool:
    """True when ``path`` opens and has coords, attention and raw scores of the same length
    (checked without reading the data; a file without a patch geometry is complete too)."""
    try:
        with h5py.File(path, "r") as f:
            rows = f["coords"].shape[0]
            complete = f["attention"].shape[0] == rows and "attention_raw" in f
            return complete and ("class_scores" not in f or f["class_scores"].shape[0] == rows)
    except (OSError, KeyError):
        return False
