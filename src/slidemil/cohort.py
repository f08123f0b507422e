"""The cohort manifest: which slides, where they are, their labels and patients.

``cohort.csv`` columns: ``slide_id, path, label, patient_id`` and optionally ``mask_path``
(a user tissue mask), ``split`` (``train``/``val``/``test``, overrides automatic splits),
``slide_mpp`` (level-0 µm/px for slides whose metadata lacks it) and ``site`` (the hospital or
scanner a slide comes from, for site-preserved splits and per-site metrics). Relative paths
resolve against the CSV's folder. Class names are the distinct labels, sorted (numerically when
all are numbers).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slidemil import atomic
from slidemil.errors import CohortError, SlidemilError
from slidemil.inputs import mask_file_problem, slide_file_problem

REQUIRED_COLUMNS = ("slide_id", "path")
TRAINING_COLUMNS = ("label", "patient_id")
OPTIONAL_COLUMNS = ("mask_path", "split", "slide_mpp", "site")
SPLIT_NAMES = ("train", "val", "test")
# slide ids become file names in every stage's output folder
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
COLUMNS = (*REQUIRED_COLUMNS, *TRAINING_COLUMNS, *OPTIONAL_COLUMNS)

if TYPE_CHECKING:  # pandas loads only where a frame is asked for: patching never needs it
    import pandas as pd


@dataclass(frozen=True)
class SlideRecord:
    """One slide of the cohort. Paths are absolute."""

    slide_id: str
    path: Path
    label: str | None = None
    patient_id: str | None = None
    mask_path: Path | None = None
    split: str | None = None
    slide_mpp: float | None = None
    site: str | None = None  # None: no site column, or a blank cell


@dataclass(frozen=True)
class Cohort:
    """A validated cohort: records in CSV order and the sorted class names."""

    slides: tuple[SlideRecord, ...]
    class_names: tuple[str, ...] = ()
    source: Path | None = None
    _by_id: dict[str, SlideRecord] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {s.slide_id: s for s in self.slides})

    def __len__(self) -> int:
        return len(self.slides)

    def __iter__(self) -> Iterator[SlideRecord]:
        return iter(self.slides)

    def __getitem__(self, slide_id: str) -> SlideRecord:
        return self._by_id[slide_id]

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._by_id

    @property
    def has_labels(self) -> bool:
        return bool(self.class_names)

    @property
    def has_sites(self) -> bool:
        """Some slide names its site (the CSV has a ``site`` column that is not all blank)."""
        return any(s.site is not None for s in self.slides)

    def label_index(self, record: SlideRecord) -> int:
        """Integer class of ``record`` in :attr:`class_names` order."""
        return self.class_names.index(record.label)

    def subset(self, slide_ids: list[str]) -> Cohort:
        """The records with these ids (in this cohort's order), keeping the class names."""
        wanted = set(slide_ids)
        kept = tuple(s for s in self.slides if s.slide_id in wanted)
        return Cohort(kept, self.class_names, self.source)

    def rows(self) -> list[dict[str, str | None]]:
        """One dict per slide over :data:`COLUMNS` (absolute paths; ``None`` for blanks)."""
        return [
            {
                "slide_id": s.slide_id,
                "path": str(s.path),
                "label": s.label,
                "patient_id": s.patient_id,
                "mask_path": None if s.mask_path is None else str(s.mask_path),
                "split": s.split,
                "slide_mpp": None if s.slide_mpp is None else repr(s.slide_mpp),
                "site": s.site,
            }
            for s in self.slides
        ]

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        frame = pd.DataFrame(self.rows(), columns=list(COLUMNS))
        frame["slide_mpp"] = [s.slide_mpp for s in self.slides]
        return frame

    def save(self, path: str | Path) -> None:
        """Write the validated manifest (absolute paths) atomically."""
        atomic.write_rows(path, COLUMNS, self.rows())


def sort_class_names(labels) -> tuple[str, ...]:
    """Distinct labels sorted; numerically when every label is a number (so 2 < 10)."""
    distinct = sorted({str(x) for x in labels})
    try:
        return tuple(sorted(distinct, key=float))
    except ValueError:
        return tuple(distinct)


def load_cohort(
    csv_path: str | Path,
    *,
    require_labels: bool = True,
    check_files: bool = True,
    class_names: tuple[str, ...] | None = None,
) -> Cohort:
    """Read and validate ``cohort.csv``; every problem is reported at once in one CohortError.

    Args:
        csv_path: the CSV file.
        require_labels: demand ``label`` and ``patient_id`` (training); prediction passes False.
        check_files: count a missing, empty or unreadable slide (or mask) file as a problem of
            the CSV. The stages pass False: for them such a row is a *bad row*, recorded in
            ``failures.csv`` (see :func:`row_problem`) while the rest of the cohort goes on.
        class_names: a fixed class order (e.g. a trained model's); labels outside it are errors.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        what = "is a directory, expected a CSV file" if csv_path.is_dir() else "file not found"
        raise CohortError(csv_path, what)
    header, rows = _read_table(csv_path)
    needed = REQUIRED_COLUMNS + (TRAINING_COLUMNS if require_labels else ())
    missing = [c for c in needed if c not in header]
    if missing:
        raise CohortError(
            csv_path,
            f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}",
            f"the header must contain {', '.join(needed)}",
        )
    if not rows:
        raise CohortError(csv_path, "no slides listed")

    problems: list[str] = []
    records: list[SlideRecord] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        record = _parse_row(row, line, csv_path.parent, require_labels, check_files, problems)
        if record is None:
            continue
        if record.slide_id in seen:
            problems.append(
                f"line {line}: duplicate slide_id {record.slide_id!r} (first on line "
                f"{seen[record.slide_id]})"
            )
            continue
        seen[record.slide_id] = line
        records.append(record)

    labels = [r.label for r in records if r.label is not None]
    if class_names is not None:
        unknown = sorted({lab for lab in labels if lab not in class_names})
        if unknown:
            problems.append(f"labels {unknown} are not among the classes {list(class_names)}")
        names = tuple(class_names)
    else:
        names = sort_class_names(labels) if labels else ()

    if problems:
        shown = "; ".join(problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CohortError(csv_path, f"{len(problems)} problem(s): {shown}{more}")
    return Cohort(tuple(records), names, csv_path)


def _read_table(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The stripped header and ``(line number, {column: cell})`` of every non-blank row.

    The csv module, not pandas: a cohort is a few thousand rows at most, and every stage's
    start-up would otherwise pay for importing pandas.
    """
    try:
        with csv_path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, skipinitialspace=True)
            header = [name.strip() for name in next(reader, [])]
            if not any(header):
                raise CohortError(csv_path, "not a readable CSV: no header line")
            twice = sorted({n for n in header if n in COLUMNS and header.count(n) > 1})
            if twice:
                raise CohortError(csv_path, f"column(s) {', '.join(twice)} appear twice")
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells) and len(cells) <= 1:
                    continue  # a blank line
                if len(cells) > len(header):
                    raise CohortError(
                        csv_path,
                        f"not a readable CSV: line {reader.line_num} has {len(cells)} fields, "
                        f"the header {len(header)}",
                    )
                cells = cells + [""] * (len(header) - len(cells))
                rows.append((reader.line_num, dict(zip(header, cells, strict=True))))
    except (csv.Error, UnicodeDecodeError) as e:
        raise CohortError(csv_path, f"not a readable CSV: {e}") from e
    return header, rows


def _parse_row(row, line, base, require_labels, check_files, problems) -> SlideRecord | None:
    def cell(name: str) -> str:
        return row.get(name, "").strip()

    start = len(problems)
    slide_id = cell("slide_id")
    if not slide_id:
        problems.append(f"line {line}: empty slide_id")
    elif not SAFE_ID.match(slide_id):
        problems.append(
            f"line {line}: slide_id {slide_id!r} must be letters, digits, '.', '_' or '-' "
            "(it names output files)"
        )
    path = _resolve(cell("path"), base)
    if path is None:
        problems.append(f"line {line}: empty path")
    elif check_files and (error := slide_file_problem(path)) is not None:
        problems.append(f"line {line}: slide {error}")

    label = cell("label") or None
    patient = cell("patient_id") or None
    if require_labels and label is None:
        problems.append(f"line {line}: empty label")
    if require_labels and patient is None:
        problems.append(f"line {line}: empty patient_id")

    mask_path = _resolve(cell("mask_path"), base)
    if mask_path is not None and check_files and (error := mask_file_problem(mask_path)):
        problems.append(f"line {line}: {error}")

    split = cell("split").lower() or None
    if split is not None and split not in SPLIT_NAMES:
        problems.append(f"line {line}: split {split!r} must be one of {', '.join(SPLIT_NAMES)}")

    slide_mpp = None
    if cell("slide_mpp"):
        try:
            slide_mpp = float(cell("slide_mpp"))
            if not slide_mpp > 0:
                raise ValueError
        except ValueError:
            problems.append(
                f"line {line}: slide_mpp {cell('slide_mpp')!r} is not a positive number"
            )
            slide_mpp = None

    if len(problems) > start or path is None:
        return None
    return SlideRecord(
        slide_id=slide_id,
        path=path,
        label=label,
        patient_id=patient if patient is not None else slide_id,
        mask_path=mask_path,
        split=split,
        slide_mpp=slide_mpp,
        site=cell("site") or None,
    )


def row_problem(record: SlideRecord, *, open_slide: bool = False) -> SlidemilError | None:
    """Why a row's slide (or mask) file cannot be used, ``None`` when it can: the check a stage
    runs on every row before any work, so a bad row fails alone (``failures.csv``).

    Reasons: ``slide_missing``, ``not_a_file``, ``empty_file``, ``unreadable``, ``mask_missing``,
    ``bad_mask``; with ``open_slide`` (``--strict``) also ``unreadable_slide`` when OpenSlide
    cannot open the file.
    """
    error = slide_file_problem(record.path)
    if error is None and record.mask_path is not None:
        error = mask_file_problem(record.mask_path)
    if error is None and open_slide:
        from slidemil.slide import Slide  # here: OpenSlide is needed only when opening

        try:
            Slide(record.path).close()
        except SlidemilError as e:
            error = e
    return error


def _resolve(value: str, base: Path) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base / path).resolve()
