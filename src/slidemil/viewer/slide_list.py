"""The slide list: ``predictions.csv`` as a sortable, filterable, paged table.

The table is read once (a row is ~100 bytes, so a 100,000-slide cohort is ~10 MB); a page is
what goes to the browser, so the page never holds the whole cohort.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from slidemil.errors import ArtifactError
from slidemil.formats.prediction_table import PROB_PREFIX

SORT_KEYS = ("slide_id", "predicted", "probability", "label", "correct", "n_patches")


@dataclass(frozen=True)
class Page:
    """One page of the list: its rows and where it sits in the filtered table."""

    rows: list[dict[str, Any]]
    total: int  # rows after filtering
    page: int  # 1-based
    pages: int


class SlideList:
    """The predicted slides of a ``predictions.csv`` (``slidemil predict`` writes it)."""

    def __init__(self, table: pd.DataFrame, class_names: list[str], source: Path):
        self.table = table
        self.class_names = class_names
        self.source = source

    @classmethod
    def read(cls, path: str | Path) -> SlideList:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(path, "predictions.csv not found", "run slidemil predict first")
        try:
            frame = pd.read_csv(path, dtype={"slide_id": str, "label": str, "predicted": str})
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise ArtifactError(path, f"unreadable predictions table: {e}") from e
        missing = [c for c in ("slide_id", "predicted") if c not in frame.columns]
        if missing:
            raise ArtifactError(path, f"no {', '.join(missing)} column: not a predictions.csv")
        classes = [c.removeprefix(PROB_PREFIX) for c in frame.columns if c.startswith(PROB_PREFIX)]
        table = pd.DataFrame({"slide_id": frame["slide_id"], "predicted": frame["predicted"]})
        probabilities = frame[[f"{PROB_PREFIX}{c}" for c in classes]].to_numpy(np.float64)
        chosen = [classes.index(p) if p in classes else -1 for p in table["predicted"]]
        table["probability"] = [
            probabilities[i, c] if c >= 0 else math.nan for i, c in enumerate(chosen)
        ]
        has_labels = "label" in frame.columns and frame["label"].notna().any()
        table["label"] = frame["label"] if has_labels else None
        table["correct"] = (
            (frame["label"] == frame["predicted"]).where(frame["label"].notna())
            if has_labels
            else None
        )
        table["n_patches"] = frame["n_patches"] if "n_patches" in frame.columns else None
        for c in classes:
            table[f"{PROB_PREFIX}{c}"] = frame[f"{PROB_PREFIX}{c}"]
        return cls(table.reset_index(drop=True), classes, path)

    @property
    def has_labels(self) -> bool:
        return bool(self.table["label"].notna().any())

    def __contains__(self, slide_id: str) -> bool:
        return bool((self.table["slide_id"] == slide_id).any())

    def row(self, slide_id: str) -> dict[str, Any] | None:
        found = self.table[self.table["slide_id"] == slide_id]
        return _records(found)[0] if len(found) else None

    def page(
        self,
        page: int = 1,
        per_page: int = 50,
        sort: str = "slide_id",
        descending: bool = False,
        predicted: str | None = None,
        correct: bool | None = None,
    ) -> Page:
        """Rows ``per_page`` at a time, sorted by ``sort`` (one of ``SORT_KEYS``), keeping only
        slides predicted as ``predicted`` and, when given, those right (or wrong)."""
        if sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}")
        table = self.table
        if predicted:
            table = table[table["predicted"] == predicted]
        if correct is not None:
            table = table[table["correct"] == correct]
        # missing values last whichever the order; ties in slide order
        table = table.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
        total = len(table)
        pages = max(1, math.ceil(total / per_page))
        page = min(max(1, page), pages)
        shown = table.iloc[(page - 1) * per_page : page * per_page]
        return Page(_records(shown), total, page, pages)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: NaN and missing values as None, numpy numbers as Python numbers."""
    rows = []
    for record in frame.to_dict("records"):
        rows.append({k: _plain(v) for k, v in record.items()})
    return rows


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        return _plain(value.item())
    return value
