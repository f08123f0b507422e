"""The one per-slide runner every stage shares.

For each slide it skips work already done (the stage says how to recognise a complete output),
runs the stage's function in a process pool, records a failure without stopping the cohort, and
shows progress with an ETA. Failures are kept one small JSON per slide under ``.failures/`` (so
concurrent shards never write the same file) and gathered into ``failures.csv`` at the end of
every run; a slide that later succeeds loses its failure record.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from slidemil import atomic
from slidemil.errors import ConfigError, SlidemilError, WorkerCrashError

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["slide_id", "path", "stage", "reason", "error", "time"]


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): every ``count``-th slide starting at ``index``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """Parse ``"i/n"`` (0-based, as SLURM_ARRAY_TASK_ID counts); ``None`` means all slides."""
        if text is None or text == "":
            return cls()
        try:
            index, count = (int(part) for part in str(text).split("/"))
        except ValueError as e:
            raise ConfigError(None, f"--shard {text!r} must look like i/n, e.g. 0/4") from e
        if count < 1 or not 0 <= index < count:
            raise ConfigError(None, f"--shard {text!r}: need 0 <= i < n")
        return cls(index, count)

    def select(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class Task:
    """One slide's unit of work: ``args`` are passed to the stage function after the id."""

    slide_id: str
    path: str
    args: tuple = ()


@dataclass
class RunSummary:
    """What a run did: slide ids per outcome and the failure messages."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.stage}: {len(self.done)} done, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed in {self.seconds:.1f} s"
        )


def run_per_slide(
    stage: str,
    tasks: Sequence[Task],
    work: Callable[..., Any],
    *,
    out_dir: str | Path,
    is_done: Callable[[Task], bool],
    workers: int = 1,
    quiet: bool = False,
    unit: str = "slide",
) -> RunSummary:
    """Run ``work(task.slide_id, *task.args)`` for every task not yet done.

    ``work`` must be a picklable top-level function when ``workers > 1``. It returns anything
    picklable (kept in ``summary.results``) and raises to fail that slide only.
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    summary = RunSummary(stage)
    todo: list[Task] = []
    for task in tasks:
        if is_done(task):
            summary.skipped.append(task.slide_id)
            _clear_failure(out_dir, task.slide_id)
        else:
            todo.append(task)

    bar = tqdm(
        total=len(todo), desc=stage, unit=unit, disable=quiet or not todo, dynamic_ncols=True
    )

    def finish(task: Task, result: Any = None, error: BaseException | None = None) -> None:
        if error is None:
            summary.done.append(task.slide_id)
            summary.results[task.slide_id] = result
            _clear_failure(out_dir, task.slide_id)
        else:
            message = _describe(error)
            summary.failed[task.slide_id] = message
            _record_failure(out_dir, stage, task, error, message)
            if not isinstance(error, SlidemilError):
                log.debug("unexpected error on %s:\n%s", task.slide_id, _format_tb(error))
            log.warning("%s failed: %s", task.slide_id, message)
        bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for task in todo:
                try:
                    finish(task, work(task.slide_id, *task.args))
                except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
                    finish(task, error=e)
        else:
            _run_pool(todo, work, workers, finish)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        write_failures_csv(out_dir)
    if not quiet:
        tqdm.write(summary.line())
    return summary


def _run_pool(todo, work, workers, finish) -> None:
    """Run ``todo`` in a process pool; a worker that dies takes only its own slide down.

    A crash in native code (a corrupt file can segfault a decoder) or an out-of-memory kill
    breaks the whole pool and fails every task in flight. Those tasks are then retried one at a
    time, each in a pool of its own, so only the slide that really crashes is recorded as failed,
    and the rest of the cohort goes on in a fresh pool.
    """
    queue = deque(todo)
    completed = [0]  # slides a worker finished, with a result or an ordinary error

    def counted_finish(task: Task, result: Any = None, error: BaseException | None = None) -> None:
        completed[0] += 1
        finish(task, result, error)

    while queue:
        suspects = _run_until_broken(queue, work, workers, counted_finish)
        crashed = [t for t in suspects if _run_until_broken(deque([t]), work, 1, counted_finish)]
        if crashed and completed[0] == 0:
            # Not one slide got through, even alone: the workers cannot start at all (a broken
            # environment, or a script without `if __name__ == "__main__":`).
            raise WorkerCrashError(
                None,
                "worker processes die before finishing any slide",
                "rerun with --workers 1 to see the error",
            )
        for task in crashed:
            crash = WorkerCrashError(
                task.path,
                "the worker process died on this slide (a crash in a native library, or out of "
                "memory)",
                "check the file, or give the run more memory",
            )
            finish(task, error=crash)


def _run_until_broken(queue: deque, work, workers: int, finish) -> list[Task]:
    """Take tasks from ``queue`` until it is empty or the pool breaks; returns the tasks that
    were in flight when it broke (their outcome is unknown)."""
    # spawn: the parent may hold threads (tqdm, torch) that make fork unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(queue)), mp_context=context) as pool:
        pending: dict[Future, Task] = {}
        # Keep a bounded number in flight so a huge cohort does not pickle every task up front.
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                task = queue.popleft()
                try:
                    pending[pool.submit(work, task.slide_id, *task.args)] = task
                except BrokenProcessPool:
                    queue.appendleft(task)
                    return list(pending.values())
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished:
                error = future.exception()
                if isinstance(error, BrokenProcessPool):
                    broken = True
                    continue
                task = pending.pop(future)
                finish(task, None if error else future.result(), error)
            if broken:
                return list(pending.values())
    return []


def _describe(error: BaseException) -> str:
    if isinstance(error, SlidemilError):
        return str(error)
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def _format_tb(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def _failure_dir(out_dir: Path) -> Path:
    return out_dir / ".failures"


def _record_failure(out_dir, stage, task, error, message) -> None:
    record = {
        "slide_id": task.slide_id,
        "path": task.path,
        "stage": stage,
        "reason": getattr(error, "reason", type(error).__name__),
        "error": message,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic.write_text(_failure_dir(out_dir) / f"{task.slide_id}.json", json.dumps(record))


def _clear_failure(out_dir: Path, slide_id: str) -> None:
    (_failure_dir(out_dir) / f"{slide_id}.json").unlink(missing_ok=True)


def write_failures_csv(out_dir: str | Path) -> Path | None:
    """Gather the per-slide failure records into ``failures.csv`` (removed when none remain)."""
    out_dir = Path(out_dir)
    target = out_dir / "failures.csv"
    folder = _failure_dir(out_dir)
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue  # a record being replaced by a concurrent shard
    if not records:
        target.unlink(missing_ok=True)
        return None
    atomic.write_csv(target, pd.DataFrame(records, columns=FAILURE_COLUMNS))
    return target


def read_failures(out_dir: str | Path) -> pd.DataFrame:
    """The failures recorded under ``out_dir`` (empty frame when none)."""
    path = Path(out_dir) / "failures.csv"
    if not path.is_file():
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    return pd.read_csv(path, dtype=str, keep_default_na=False)
