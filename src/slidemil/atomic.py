"""Atomic output: every artifact is written to a temp name in its final folder, then renamed.

A reader therefore sees either no file or a complete one, and a killed run leaves only temp files,
which the next run ignores and overwrites.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

TEMP_MARKER = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """A unique temp name beside ``final`` that keeps its suffix (image writers infer format)."""
    return final.with_name(f".{final.stem}{TEMP_MARKER}{uuid.uuid4().hex[:8]}{final.suffix}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``final``, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_rows(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """A CSV of ``rows`` (dicts over ``columns``; ``None`` is a blank cell), with the csv
    module, for writers that should not import pandas."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])


def is_temp_file(path: Path) -> bool:
    """True for a temp file of :func:`atomic_path` (``.<stem>.tmp-<8 hex><suffix>``)."""
    return path.name.startswith(".") and TEMP_MARKER in path.name


def remove_temps(folder: str | Path, stem: str) -> None:
    """Delete the temp files of ``folder/<stem>.*`` a killed run left behind.

    Call it only while holding that output's lock (:class:`slidemil.locks.SlideLocks`): a temp
    file of a slide another process is writing right now is not stale.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for stale in folder.glob(f".{glob.escape(stem)}{TEMP_MARKER}*"):
        stale.unlink(missing_ok=True)
