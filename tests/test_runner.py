"""The shared per-slide runner: skipping, failures, shards, process pool."""

from __future__ import annotations

import pytest

from slidemil.errors import ConfigError, SlideOpenError, WorkerCrashError
from slidemil.runner import Shard, Task, read_failures, run_per_slide


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
