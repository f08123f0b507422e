"""Cheap checks that an input file can be used, before a stage spends time on it.

A stage runs them on every row of its cohort first, so a missing path, a directory, an empty file
(an interrupted copy) or one without read permission is recorded as that row's failure with a
machine-readable reason, while the other rows go on (see :func:`slidemil.runner.plan_slides`).
They stat the file and read one byte: cheap even for thousands of slides on network storage.
"""

from __future__ import annotations

from pathlib import Path

from slidemil.errors import (
    ArtifactError,
    EmptyFileError,
    MaskError,
    MaskMissingError,
    NotAFileError,
    SlidemilError,
    SlideMissingError,
    UnreadableFileError,
)


def slide_file_problem(path: str | Path) -> SlidemilError | None:
    """Why the slide file ``path`` cannot be used (``None`` when it looks usable).

    Reasons: ``slide_missing``, ``not_a_file``, ``empty_file``, ``unreadable``. Whether
    OpenSlide can decode the file is left to :class:`slidemil.slide.Slide`.
    """
    path = Path(path)
    if not path.exists():
        return SlideMissingError(path, "file not found")
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file"
        return NotAFileError(path, f"{what}, expected a slide file", "fix its path in the CSV")
    return _content_problem(path, EmptyFileError, UnreadableFileError, "slide")


def mask_file_problem(path: str | Path) -> SlidemilError | None:
    """Why the user tissue mask ``path`` cannot be used (reasons ``mask_missing``, ``bad_mask``)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        return MaskMissingError(path, f"mask {what}", "fix its mask_path in the CSV")
    return _content_problem(path, MaskError, MaskError, "mask")


def artifact_file_problem(
    path: str | Path, kind: str, fix: str | None = None
) -> ArtifactError | None:
    """Why the ``kind`` file (``"patch"``, ``"feature"``, ``"attention"``) at ``path`` cannot be
    used (reason ``bad_artifact``); its HDF5 content is checked by the stage's reader."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        return ArtifactError(path, f"{kind} file {what}", fix)
    return _content_problem(path, ArtifactError, ArtifactError, f"{kind} file")


def _content_problem(path: Path, empty_error, unreadable_error, what: str):
    try:
        with path.open("rb") as f:
            first = f.read(1)
    except OSError as e:
        return unreadable_error(path, f"cannot read the {what}: {e.strerror or e}")
    if not first:
        return empty_error(path, f"empty {what} (0 bytes)", "copy it again")
    return None
