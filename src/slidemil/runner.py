"""The one per-slide runner every stage shares.

For each slide it skips work already done (the stage says how to recognise a complete output),
runs the stage's function in a process pool, records a failure without stopping the cohort, and
shows progress with an ETA. Failures are kept one small JSON per slide under ``.failures/`` (so
concurrent shards never write the same file) and gathered into ``failures.csv`` at the end of
every run; a slide that later succeeds loses its failure record.

Before any work, :func:`plan_slides` sorts the slides into already done (optionally: made with
the same options fingerprint), *bad rows* (inputs that cannot be used: recorded as failures with
a reason, or the whole run refused under ``strict``) and to do. While a slide is computed its
lock file ``.locks/<slide_id>.lock`` (``O_EXCL``) keeps other processes on the same folder off
it; see :class:`SlideLocks`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from slidemil import atomic
from slidemil.errors import (
    BadRowsError,
    ConfigError,
    SlidemilError,
    WorkerCrashError,
    error_class_for,
)
from slidemil.locks import SlideLocks

if TYPE_CHECKING:  # loaded where a failures table is read: a clean run never needs pandas
    import pandas as pd

log = logging.getLogger(__name__)

FAILURE_COLUMNS = ["slide_id", "path", "stage", "reason", "error", "time"]
LOCK_DIR = ".locks"  # <slide_id>.lock of the slides being computed, under the output folder
DONE_DIR = ".done"  # <slide_id>.json: the options fingerprint each finished output was made with
GATHER_LOCK = "failures.csv"  # serialises the gathering of failures.csv
GATHER_WAIT_SECONDS = 30.0


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
    """What a run did: slide ids per outcome and the failure messages.

    ``failed`` includes the ``bad`` rows (inputs found unusable before any work); ``locked``
    slides were being computed by another process and are not failures.
    """

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        plural = "s" if len(self.bad) != 1 else ""
        bad = f" ({len(self.bad)} bad row{plural})" if self.bad else ""
        locked = f", {len(self.locked)} locked by another process" if self.locked else ""
        return (
            f"{self.stage}: {len(self.done)} done, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed{bad}{locked} in {self.seconds:.1f} s"
        )


def options_fingerprint(values: Any) -> str:
    """A short hash of JSON-serialisable ``values`` (a stage's result options and a slide's own
    inputs): the runner keeps a slide's output only when it was made with the same one."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class SlidePlan:
    """Which slides of a run are already done, which have unusable inputs, and which to do.

    Made by :func:`plan_slides`; :meth:`run` does the work. A stage that must prepare something
    for exactly the slides to do (extraction's patch stream) reads :attr:`todo` in between.
    """

    stage: str
    out_dir: Path
    todo: list[Task]
    skipped: list[str]
    bad: dict[str, SlidemilError]
    tasks: dict[str, Task]
    is_done: Callable[[Task], bool]
    fingerprints: dict[str, str] = field(default_factory=dict)  # slide id -> wanted

    def run(
        self,
        work: Callable[..., Any],
        *,
        workers: int = 1,
        quiet: bool = False,
        unit: str = "slide",
        cleanup: Callable[[Task], None] | None = None,
    ) -> RunSummary:
        """Run ``work(task.slide_id, *task.args)`` for every slide of :attr:`todo`.

        Each slide is first locked (``out_dir/.locks/<slide_id>.lock``, created with
        ``O_EXCL``): a slide another live process holds, or failed during this run, is left to
        it (``summary.locked``), and one finished meanwhile is skipped. ``cleanup(task)`` runs
        once the lock is held, before the work: the place to delete temp files a killed run
        left for that slide. ``work`` must be a picklable top-level function when
        ``workers > 1``; it returns anything picklable (kept in ``summary.results``) and raises
        to fail that slide only.
        """
        start = time.perf_counter()
        started = time.time()
        summary = RunSummary(self.stage, skipped=list(self.skipped))
        for slide_id, error in self.bad.items():
            summary.failed[slide_id] = _describe(error)
            summary.bad.append(slide_id)
            _record_failure(self.out_dir, self.stage, self.tasks[slide_id], error, str(error))
        locks = SlideLocks(self.out_dir / LOCK_DIR, self.stage)
        begun: set[str] = set()
        bar = tqdm(
            total=len(self.todo), desc=self.stage, unit=unit, disable=quiet or not self.todo,
            dynamic_ncols=True,
        )  # fmt: skip

        def begin(task: Task) -> bool:
            """Lock ``task`` (once); False when another process has it or it is done now."""
            if task.slide_id in begun:
                return True
            if not locks.acquire(task.slide_id):
                summary.locked.append(task.slide_id)
                bar.update(1)
                return False
            if self.is_done(task):  # finished by another process since planning
                locks.release(task.slide_id)
                summary.skipped.append(task.slide_id)
                bar.update(1)
                return False
            if _failed_since(self.out_dir, task.slide_id, started):  # by another process, now
                locks.release(task.slide_id)
                summary.locked.append(task.slide_id)
                bar.update(1)
                return False
            begun.add(task.slide_id)
            if cleanup is not None:
                cleanup(task)
            return True

        def finish(task: Task, result: Any = None, error: BaseException | None = None) -> None:
            try:
                if error is None:
                    summary.done.append(task.slide_id)
                    summary.results[task.slide_id] = result
                    self._mark_done(task)
                    _clear_failure(self.out_dir, task.slide_id)
                else:
                    message = _describe(error)
                    summary.failed[task.slide_id] = message
                    _record_failure(self.out_dir, self.stage, task, error, message)
                    if not isinstance(error, SlidemilError):
                        log.debug("unexpected error on %s:\n%s", task.slide_id, _format_tb(error))
                    log.warning("%s failed: %s", task.slide_id, message)
            finally:
                locks.release(task.slide_id)
                bar.update(1)

        locks.start_heartbeat()
        try:
            if workers <= 1 or len(self.todo) <= 1:
                for task in self.todo:
                    if not begin(task):
                        continue
                    try:
                        result = work(task.slide_id, *task.args)
                    except Exception as e:  # noqa: BLE001 - one bad slide never stops the cohort
                        finish(task, error=e)
                    else:
                        finish(task, result)
            else:
                _run_pool(self.todo, work, workers, begin, finish)
        finally:
            locks.release_all()
            bar.close()
            summary.seconds = time.perf_counter() - start
            write_failures_csv(self.out_dir)
        if not quiet:
            tqdm.write(summary.line())
        return summary

    def _mark_done(self, task: Task) -> None:
        fingerprint = self.fingerprints.get(task.slide_id)
        if fingerprint is not None:
            record = {"fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic.write_text(_marker_path(self.out_dir, task.slide_id), json.dumps(record))


def plan_slides(
    stage: str,
    tasks: Sequence[Task],
    *,
    out_dir: str | Path,
    is_done: Callable[[Task], bool],
    check: Callable[[Task], SlidemilError | None] | None = None,
    fingerprint: Callable[[Task], str] | None = None,
    strict: bool = False,
    source: str | Path | None = None,
) -> SlidePlan:
    """Sort ``tasks`` into done, bad and to-do, before any work.

    Args:
        is_done: whether a slide's output is complete (the stage knows its files).
        check: why a slide's inputs cannot be used (``None`` when they can); such a slide is a
            *bad row*: recorded in ``failures.csv`` by :meth:`SlidePlan.run`, never worked on.
        fingerprint: the options (and per-slide inputs) a slide's output depends on, as
            :func:`options_fingerprint`; an output counts as done only when it was made with the
            same fingerprint (recorded in ``out_dir/.done/<slide_id>.json``), so an interrupted
            run with new options never leaves old outputs that look finished.
        strict: raise :class:`BadRowsError` listing every bad row instead of going on.
        source: the file named in that error (the cohort CSV); default ``out_dir``.
    """
    out_dir = Path(out_dir)
    fingerprints = {t.slide_id: fingerprint(t) for t in tasks} if fingerprint else {}

    def done(task: Task) -> bool:
        if not is_done(task):
            return False
        wanted = fingerprints.get(task.slide_id)
        return wanted is None or _marked_fingerprint(out_dir, task.slide_id) == wanted

    skipped: list[str] = []
    bad: dict[str, SlidemilError] = {}
    todo: list[Task] = []
    for task in tasks:
        if done(task):
            skipped.append(task.slide_id)
            _clear_failure(out_dir, task.slide_id)
            continue
        problem = check(task) if check is not None else None
        if problem is not None:
            bad[task.slide_id] = problem
        else:
            todo.append(task)
    if bad:
        _report_bad_rows(stage, bad, len(tasks), out_dir, strict, source)
    by_id = {t.slide_id: t for t in tasks}
    return SlidePlan(stage, out_dir, todo, skipped, bad, by_id, done, fingerprints)


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
    check: Callable[[Task], SlidemilError | None] | None = None,
    fingerprint: Callable[[Task], str] | None = None,
    strict: bool = False,
    source: str | Path | None = None,
    cleanup: Callable[[Task], None] | None = None,
) -> RunSummary:
    """Plan (:func:`plan_slides`) and run (:meth:`SlidePlan.run`) in one call."""
    plan = plan_slides(
        stage, tasks, out_dir=out_dir, is_done=is_done, check=check, fingerprint=fingerprint,
        strict=strict, source=source,
    )  # fmt: skip
    return plan.run(work, workers=workers, quiet=quiet, unit=unit, cleanup=cleanup)


def earlier_failure(record: dict[str, Any]) -> SlidemilError:
    """The error of a ``failures.csv`` row of an earlier stage, as a later stage reports it for
    the same slide (same reason; the message says which stage). Not counted again in the
    bad-row warning: the earlier stage warned about it already."""
    kind = error_class_for(str(record.get("reason", "")))
    error = kind(None, f"{record.get('stage') or 'an earlier stage'}: {record.get('error', '')}")
    error.earlier_stage = True
    return error


def _report_bad_rows(stage, bad, total, out_dir, strict, source) -> None:
    """One warning line that counts the bad rows by reason, or (strict) one error listing them."""
    if strict:
        shown = "; ".join(f"{sid}: {error}" for sid, error in list(bad.items())[:20])
        more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise BadRowsError(
            source or out_dir,
            f"--strict: {len(bad)} of {total} row(s) cannot be processed: {shown}{more}",
            "fix or remove those rows, or drop --strict to record them in failures.csv and go on",
        )
    new = [e for e in bad.values() if not getattr(e, "earlier_stage", False)]
    if not new:
        return
    reasons = Counter(e.reason for e in new)
    counted = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    log.warning(
        "%s: %d of %d slide(s) cannot be processed (%s); they are recorded in %s and the "
        "others go on",
        stage, len(new), total, counted, out_dir / "failures.csv",
    )  # fmt: skip
    for slide_id, error in bad.items():
        log.debug("%s: %s", slide_id, error)


def _run_pool(todo, work, workers, begin, finish) -> None:
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
        suspects = _run_until_broken(queue, work, workers, begin, counted_finish)
        crashed = [
            t for t in suspects if _run_until_broken(deque([t]), work, 1, begin, counted_finish)
        ]
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


def _run_until_broken(queue: deque, work, workers: int, begin, finish) -> list[Task]:
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
                if not begin(task):
                    continue
                try:
                    pending[pool.submit(work, task.slide_id, *task.args)] = task
                except BrokenProcessPool:
                    queue.appendleft(task)
                    return list(pending.values())
            if not pending:
                break
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


def _marker_path(out_dir: Path, slide_id: str) -> Path:
    return out_dir / DONE_DIR / f"{slide_id}.json"


def _marked_fingerprint(out_dir: Path, slide_id: str) -> str | None:
    """The fingerprint a slide's finished output was made with (``None``: none recorded)."""
    try:
        return json.loads(_marker_path(out_dir, slide_id).read_text(encoding="utf-8"))[
            "fingerprint"
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def _failed_since(out_dir: Path, slide_id: str, since: float) -> bool:
    """True when another process recorded this slide's failure after ``since`` (time.time())."""
    try:
        return (_failure_dir(out_dir) / f"{slide_id}.json").stat().st_mtime >= since
    except FileNotFoundError:
        return False


def _clear_failure(out_dir: Path, slide_id: str) -> None:
    (_failure_dir(out_dir) / f"{slide_id}.json").unlink(missing_ok=True)


def write_failures_csv(out_dir: str | Path) -> Path | None:
    """Gather the per-slide failure records into ``failures.csv`` (removed when none remain).

    Processes sharing ``out_dir`` gather one at a time (a lock file), and each gathers after
    writing its own records, so the last writer's table holds every record: none lost by an
    older table renamed over a newer one. Temp files of records being written are not records.
    """
    out_dir = Path(out_dir)
    target = out_dir / "failures.csv"
    folder = _failure_dir(out_dir)
    gather = SlideLocks(out_dir / LOCK_DIR, "failures")
    held = gather.acquire(GATHER_LOCK, wait=GATHER_WAIT_SECONDS)
    try:
        records = {}
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            if atomic.is_temp_file(path):
                continue
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue  # removed by a process whose slide has just succeeded
            records[record.get("slide_id", path.stem)] = record
        if not records:
            target.unlink(missing_ok=True)
            return None
        atomic.write_rows(target, FAILURE_COLUMNS, records.values())
        return target
    finally:
        if held:
            gather.release_all()


def read_failures(out_dir: str | Path) -> pd.DataFrame:
    """The failures recorded under ``out_dir`` (empty frame when none)."""
    import pandas as pd

    path = Path(out_dir) / "failures.csv"
    if not path.is_file():
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    return pd.read_csv(path, dtype=str, keep_default_na=False)
