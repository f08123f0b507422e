"""The command line as a user first meets it: ``slidemil --help``."""

from __future__ import annotations

import os
import subprocess
import sys

from slidemil.cli.app import summary_line


def _help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    result = subprocess.run(
        [sys.executable, "-m", "slidemil", *args], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    return result.stdout


def test_the_command_list_shows_one_sentence_per_command_and_each_help_keeps_the_whole_text():
    listing = _help("--help")
    assert "train" in listing and "extract" in listing and "heatmap" in listing
    # the demo's docstring goes on after its first sentence; the list stops there
    assert "prints the balanced accuracy" not in listing
    assert "prints the balanced accuracy" in " ".join(_help("demo", "--help").split())


def test_summary_line_is_the_first_sentence_cut_at_a_top_level_colon_when_long():
    assert summary_line("Write a synthetic cohort.\n\nMore text.") == "Write a synthetic cohort"
    assert summary_line("Train models on bags. Then more.") == "Train models on bags"
    long = "Evaluate a run: " + "accuracy, " * 12 + "and plots."
    assert summary_line(long) == "Evaluate a run"
    bracketed = "Encode patches (resumable; " + "x " * 40 + ") fast."
    assert summary_line(bracketed) == bracketed.rstrip(".")


def test_a_command_imports_only_its_own_stage():
    """``slidemil patch`` starts without importing the other stages, pandas or torch (a cohort
    of small slides is patched in less time than those imports take); ``--help`` lists all."""
    probe = (
        "import sys\n"
        "from slidemil.cli.app import main\n"
        "sys.argv = ['slidemil', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "names = ('pandas', 'torch', 'slidemil.cli.train_command', 'slidemil.cli.patch_command')\n"
        "print(','.join(n for n in names if n in sys.modules))\n"
    )
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}

    def loaded(*args: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env,
            check=True,
        )  # fmt: skip
        return result.stdout.strip().splitlines()[-1].split(",")

    assert loaded("patch", "--help") == ["slidemil.cli.patch_command"]
    assert loaded("--verbose", "patch", "--help") == ["slidemil.cli.patch_command"]
    assert "slidemil.cli.train_command" in loaded("--help")
    assert "slidemil.cli.train_command" in loaded("nonsense")  # typer names the known commands
