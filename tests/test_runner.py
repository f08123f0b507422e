"""The shared per-slide runner: skipping, failures, shards, process pool."""

from __future__ import annotations

import json

import pytest

from slidemil.errors import ConfigError, SlideOpenError, WorkerCrashError
from slidemil.runner import Shard, Task, options_fingerprint, read_failures, run_per_slide


def square_or_fail(slide_id: str, value: int, out: str) -> int:
    if value < 0:
        raise SlideOpenError(f"{slide_id}.svs", "not a slide format OpenSlide can read")
    if value == 13:
        raise ValueError("unlucky")
    from pathlib import Path

    Path(out, f"{slide_id}.done").write_text(str(value * value))
    return value * value


def _tasks(tmp_path, values):
    return [Task(f"s{i}", f"s{i}.svs", (v, str(tmp_path))) for i, v in enumerate(values)]


def _done(tmp_path):
    return lambda task: (tmp_path / f"{task.slide_id}.done").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_recorded_and_the_rest_finish(tmp_path, workers):
    tasks = _tasks(tmp_path, [1, -1, 2, 13, 3])
    summary = run_per_slide(
        "test",
        tasks,
        square_or_fail,
        out_dir=tmp_path,
        is_done=_done(tmp_path),
        workers=workers,
        quiet=True,
    )
    assert sorted(summary.done) == ["s0", "s2", "s4"]
    assert summary.results["s4"] == 9
    failures = read_failures(tmp_path).set_index("slide_id")
    assert set(failures.index) == {"s1", "s3"}
    assert failures.loc["s1", "reason"] == "unreadable_slide"
    assert "s1.svs: not a slide format" in failures.loc["s1", "error"]
    assert failures.loc["s3", "error"] == "ValueError: unlucky"


def test_rerun_skips_done_and_clears_fixed_failures(tmp_path):
    values = [1, -1]
    run_per_slide(
        "t",
        _tasks(tmp_path, values),
        square_or_fail,
        out_dir=tmp_path,
        is_done=_done(tmp_path),
        quiet=True,
    )
    assert (tmp_path / "failures.csv").is_file()
    summary = run_per_slide(
        "t",
        _tasks(tmp_path, [1, 5]),
        square_or_fail,
        out_dir=tmp_path,
        is_done=_done(tmp_path),
        quiet=True,
    )
    assert summary.skipped == ["s0"] and summary.done == ["s1"]
    assert not (tmp_path / "failures.csv").exists()


def test_shards_cover_every_slide_exactly_once():
    items = list(range(23))
    shards = [Shard(i, 4).select(items) for i in range(4)]
    assert sorted(x for shard in shards for x in shard) == items
    assert Shard.parse("2/4") == Shard(2, 4)
    assert Shard.parse(None) == Shard(0, 1)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ConfigError):
            Shard.parse(bad)


def crash_on_negative(slide_id: str, value: int, out: str) -> int:
    """Dies like a segfaulting decoder would: no exception, the process is gone."""
    import os

    if value < 0:
        os._exit(139)
    return square_or_fail(slide_id, value, out)


def test_a_worker_that_dies_fails_only_its_slide(tmp_path):
    tasks = _tasks(tmp_path, [1, 2, -1, 3, 4, 5])
    summary = run_per_slide(
        "test",
        tasks,
        crash_on_negative,
        out_dir=tmp_path,
        is_done=_done(tmp_path),
        workers=2,
        quiet=True,
    )
    assert sorted(summary.done) == ["s0", "s1", "s3", "s4", "s5"]
    failures = read_failures(tmp_path).set_index("slide_id")
    assert list(failures.index) == ["s2"]
    assert failures.loc["s2", "reason"] == "worker_crashed"
    assert failures.loc["s2", "error"].startswith("s2.svs: the worker process died")


def always_crash(slide_id: str, value: int, out: str) -> int:
    import os

    os._exit(1)


def test_workers_that_cannot_run_at_all_stop_the_run_with_one_clear_error(tmp_path):
    with pytest.raises(WorkerCrashError, match=r"die before finishing any slide.*--workers 1"):
        run_per_slide(
            "test",
            _tasks(tmp_path, [1, 2, 3, 4, 5, 6]),
            always_crash,
            out_dir=tmp_path,
            is_done=_done(tmp_path),
            workers=2,
            quiet=True,
        )


# --- bad rows, fingerprints, locks -------------------------------------------------------------


def _missing_input(task):
    from slidemil.errors import SlideMissingError

    return SlideMissingError(task.path, "file not found") if task.args[0] == 0 else None


def test_bad_rows_fail_alone_with_one_warning_line(tmp_path, caplog):
    tasks = _tasks(tmp_path, [1, 0, 2, 0])
    with caplog.at_level("WARNING", logger="slidemil.runner"):
        summary = run_per_slide(
            "test", tasks, square_or_fail, out_dir=tmp_path, is_done=_done(tmp_path),
            check=_missing_input, quiet=True,
        )  # fmt: skip
    assert sorted(summary.done) == ["s0", "s2"] and sorted(summary.bad) == ["s1", "s3"]
    assert not (tmp_path / "s1.done").exists()  # never worked on
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert (
        len(warnings) == 1 and "2 of 4 slide(s)" in warnings[0] and "2 slide_missing" in warnings[0]
    )
    failures = read_failures(tmp_path).set_index("slide_id")
    assert sorted(failures.index) == ["s1", "s3"]
    assert set(failures["reason"]) == {"slide_missing"}
    assert "(2 bad rows)" in summary.line()


def test_strict_refuses_every_bad_row_at_once_before_any_work(tmp_path):
    from slidemil.errors import BadRowsError

    with pytest.raises(BadRowsError, match=r"--strict: 2 of 3 row\(s\).*s0\.svs.*s2\.svs"):
        run_per_slide(
            "test", _tasks(tmp_path, [0, 1, 0]), square_or_fail, out_dir=tmp_path,
            is_done=_done(tmp_path), check=_missing_input, strict=True, quiet=True,
        )  # fmt: skip
    assert not list(tmp_path.glob("*.done")) and not (tmp_path / "failures.csv").exists()


def test_outputs_of_other_options_never_count_as_done(tmp_path):
    def run(options):
        return run_per_slide(
            "test", _tasks(tmp_path, [1, 2, 3]), square_or_fail, out_dir=tmp_path,
            is_done=_done(tmp_path), fingerprint=lambda task: options_fingerprint(options),
            quiet=True,
        )  # fmt: skip

    assert len(run({"size": 1}).done) == 3
    assert len(run({"size": 1}).skipped) == 3
    assert len(run({"size": 2}).done) == 3  # same files, made with other options: redone


def _hold_lock(folder: str, ready, release) -> None:
    from pathlib import Path

    from slidemil.locks import SlideLocks

    locks = SlideLocks(Path(folder), "other")
    locks.acquire("s1")
    ready.set()
    release.wait(30)
    locks.release_all()


def test_a_slide_locked_by_a_live_process_is_left_to_it(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path / ".locks"), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        summary = run_per_slide(
            "test", _tasks(tmp_path, [1, 2, 3]), square_or_fail, out_dir=tmp_path,
            is_done=_done(tmp_path), quiet=True,
        )  # fmt: skip
    finally:
        release.set()
        holder.join(30)
    assert summary.locked == ["s1"] and sorted(summary.done) == ["s0", "s2"]
    assert not summary.failed and not (tmp_path / "failures.csv").exists()
    assert "1 locked by another process" in summary.line()


def test_stale_locks_of_dead_or_silent_owners_are_taken_over(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    from slidemil.locks import LOCK_STALE_SECONDS

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / ".locks"
    folder.mkdir()
    here = socket.gethostname()
    owners = {"s0": {"host": here, "pid": dead.pid, "token": "a"},
              "s1": {"host": "another-node", "pid": 1, "token": "b"},
              "s2": {"host": "another-node", "pid": 1, "token": "c"}}  # fmt: skip
    for name, owner in owners.items():
        (folder / f"{name}.lock").write_text(json.dumps(owner))
    old = time.time() - LOCK_STALE_SECONDS - 60
    os.utime(folder / "s1.lock", (old, old))  # silent for too long; s2 was touched just now
    summary = run_per_slide(
        "test", _tasks(tmp_path, [1, 2, 3]), square_or_fail, out_dir=tmp_path,
        is_done=_done(tmp_path), quiet=True,
    )  # fmt: skip
    assert sorted(summary.done) == ["s0", "s1"] and summary.locked == ["s2"]
    assert [p.name for p in folder.iterdir()] == ["s2.lock"]  # ours released, theirs kept


def slow_square(slide_id: str, value: int, out: str) -> int:
    """Logs every computation (O_APPEND: one line per write) so a test can count them."""
    import os
    import time
    from pathlib import Path

    with Path(out, "computed.log").open("a") as log:
        log.write(f"{slide_id} {os.getpid()}\n")
    time.sleep(0.3)
    return square_or_fail(slide_id, value, out)


def _run_shared(out: str, values: list[int], start) -> None:
    from pathlib import Path

    start.wait(120)  # a barrier: both processes begin together, however slow their start-up
    tasks = [Task(f"s{i}", f"s{i}.svs", (v, out)) for i, v in enumerate(values)]
    run_per_slide(
        "test", tasks, slow_square, out_dir=out, quiet=True,
        is_done=lambda task: Path(out, f"{task.slide_id}.done").is_file(),
    )  # fmt: skip


def test_two_processes_on_one_folder_compute_each_slide_once(tmp_path):
    import multiprocessing

    values = [1, -1, 2, 13, 3, 4, 5, -1]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [
        context.Process(target=_run_shared, args=(str(tmp_path), values, start)) for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    computed = [line.split()[0] for line in (tmp_path / "computed.log").read_text().splitlines()]
    assert sorted(computed) == sorted(f"s{i}" for i in range(len(values)))  # each exactly once
    pids = {line.split()[1] for line in (tmp_path / "computed.log").read_text().splitlines()}
    assert len(pids) == 2, "both processes should have worked"
    failures = read_failures(tmp_path)
    assert sorted(failures["slide_id"]) == ["s1", "s3", "s7"]  # none lost, none twice
    assert not (tmp_path / ".locks").exists()


def test_failures_csv_ignores_temp_files_of_records_being_written(tmp_path):
    import json

    from slidemil.runner import write_failures_csv

    folder = tmp_path / ".failures"
    folder.mkdir()
    record = {"slide_id": "s1", "path": "s1.svs", "stage": "t", "reason": "x", "error": "e",
              "time": "now"}  # fmt: skip
    (folder / "s1.json").write_text(json.dumps(record))
    (folder / ".s1.tmp-0123abcd.json").write_text(json.dumps(record))  # a rename in flight
    write_failures_csv(tmp_path)
    assert list(read_failures(tmp_path)["slide_id"]) == ["s1"]


def test_locks_survive_other_processes_removing_the_emptied_folder(tmp_path):
    """Each finishing run removes the empty lock folder; another run making it at that moment
    must still get its lock (two patch processes on one folder once failed so)."""
    import threading

    from slidemil.locks import SlideLocks

    folder, errors = tmp_path / ".locks", []

    def churn(name: str) -> None:
        try:
            for _ in range(2000):
                locks = SlideLocks(folder, "test")
                assert locks.acquire(name)
                locks.release_all()  # removes the folder when it is empty
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=churn, args=(name,)) for name in "abc"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_lock_left_empty_is_taken_over_once_it_is_not_new(tmp_path):
    """A process killed while creating its lock (an older slidemil wrote the owner after
    creating the file) leaves an empty lock: a rerun takes it over instead of waiting 10 min."""
    import os
    import time

    from slidemil.locks import UNREADABLE_LOCK_SECONDS, SlideLocks

    locks = SlideLocks(tmp_path / ".locks", "test")
    empty = locks.path("slide_a")
    empty.parent.mkdir()
    empty.write_text("")
    assert not locks.acquire("slide_a")  # just written: perhaps being filled right now
    old = time.time() - UNREADABLE_LOCK_SECONDS - 5
    os.utime(empty, (old, old))
    assert locks.acquire("slide_a")
    assert json.loads(empty.read_text())["pid"] == os.getpid()  # it appeared with its owner
    locks.release_all()
    assert not (tmp_path / ".locks").exists()
