"""The prediction tables every stage shares: ``predictions.csv`` and ``val_predictions.csv``.

Training writes them per fold, ``predict`` for new slides, and evaluation and the viewer read
them. Each has one row per slide and one probability column per class, named
``prob_<class>`` in the run's class order.
"""

from __future__ import annotations

from collections.abc import Sequence

PROB_PREFIX = "prob_"


def probability_columns(class_names: Sequence[str]) -> list[str]:
    """The probability column names of ``class_names``, in that order."""
    return [f"{PROB_PREFIX}{name}" for name in class_names]


def class_of_column(column: str) -> str | None:
    """The class a probability column is for (``None``: not a probability column)."""
    return column.removeprefix(PROB_PREFIX) if column.startswith(PROB_PREFIX) else None
