"""One exception type per failure a user can act on.

Every error names the file it is about and, where there is one, the fix. Messages stay on one
line so they read well in ``failures.csv`` and in SLURM logs. All errors pickle, so a failure in a
worker process reaches the parent intact.
"""

from __future__ import annotations

from pathlib import Path


class SlidemilError(Exception):
    """Base class. ``reason`` is a short machine-readable tag recorded in ``failures.csv``."""

    reason = "error"

    def __init__(self, path: str | Path | None, problem: str, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.path}: " if self.path else ""
        hint = f" ({self.fix})" if self.fix else ""
        return f"{where}{self.problem}{hint}".replace("\n", " ")

    def __reduce__(self):
        return (type(self), (self.path, self.problem, self.fix))


class SlideOpenError(SlidemilError):
    """The file is missing, is a directory, or is not a slide OpenSlide can read."""

    reason = "unreadable_slide"


class SlideMissingError(SlideOpenError):
    """The slide path of a row does not exist."""

    reason = "slide_missing"


class NotAFileError(SlideOpenError):
    """The path of a row is a directory (or another non-file), not a slide file."""

    reason = "not_a_file"


class EmptyFileError(SlideOpenError):
    """The file of a row is empty (0 bytes): an interrupted copy or download."""

    reason = "empty_file"


class UnreadableFileError(SlideOpenError):
    """The file exists but cannot be read (permissions, an I/O error on network storage)."""

    reason = "unreadable"


class MissingMppError(SlidemilError):
    """The slide has no µm/px metadata and no override was given."""

    reason = "no_mpp"


class SlideReadError(SlidemilError):
    """A region of an otherwise readable slide could not be decoded (corrupt tile)."""

    reason = "corrupt_region"


class CohortError(SlidemilError):
    """The cohort CSV is malformed: every problem is listed, each naming its row."""

    reason = "bad_cohort"


class BadRowsError(CohortError):
    """``--strict``: some rows cannot be processed (missing, empty or unreadable files), so the
    cohort is refused before any work; every bad row is listed."""

    reason = "bad_rows"


class ConfigError(SlidemilError):
    """A configuration file or option is invalid (unknown key, wrong type, bad value)."""

    reason = "bad_config"


class ArtifactError(SlidemilError):
    """A patch, feature, attention or checkpoint file is missing, truncated or of another format."""

    reason = "bad_artifact"


class MaskError(SlidemilError):
    """A user tissue mask cannot be read or does not match its slide."""

    reason = "bad_mask"


class MaskMissingError(MaskError):
    """The ``mask_path`` of a row does not exist (or is not a file)."""

    reason = "mask_missing"


class NoTissueError(SlidemilError):
    """Segmentation found no tissue (or no patch passed the tissue threshold)."""

    reason = "no_tissue"


class WeightsError(SlidemilError):
    """Pretrained weights are missing, gated, or do not fit the model."""

    reason = "missing_weights"


class MissingExtraError(SlidemilError):
    """An optional dependency is not installed; the message names the extra to install."""

    reason = "missing_extra"


class WorkerCrashError(SlidemilError):
    """The worker process died on this slide (a crash in a native library, or out of memory)."""

    reason = "worker_crashed"


class RegistryError(SlidemilError):
    """An unknown or duplicate name in a registry (encoders, MIL models)."""

    reason = "unknown_name"


def error_class_for(reason: str) -> type[SlidemilError]:
    """The error class whose ``reason`` is ``reason`` (:class:`SlidemilError` when none is), to
    rebuild an error read back from a ``failures.csv`` row."""
    found = [SlidemilError]
    while found:
        kind = found.pop()
        if kind.reason == reason:
            return kind
        found.extend(kind.__subclasses__())
    return SlidemilError
