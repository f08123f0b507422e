"""The SLURM examples stay true: valid bash, and every slidemil option they use exists."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer

from slidemil.cli.app import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "slurm"
SCRIPTS = sorted(EXAMPLES.glob("*.sbatch")) + sorted(EXAMPLES.glob("*.sh"))


def _command_options() -> dict[str, set[str]]:
    from slidemil.cli import commands  # noqa: F401  (registers every command)

    group = typer.main.get_command(app)
    return {
        name: {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        for name, command in group.commands.items()
    }


def _slidemil_calls(text: str) -> list[list[str]]:
    """Each ``slidemil <command> ...`` or ``-m slidemil <command> ...`` as a token list."""
    joined = re.sub(r"\\\n\s*", " ", text)
    calls = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"slidemil (\w+)(.*)$", line):
            rest = match.group(2)
            try:
                tokens = shlex.split(rest)
            except ValueError:  # a call inside a quoted string: cut at its closing quote
                tokens = shlex.split(rest[: rest.rindex('"')])
            calls.append([match.group(1), *tokens])
    return calls


def test_there_are_examples():
    names = {p.name for p in SCRIPTS}
    assert {"patch_array.sbatch", "extract_gpus.sbatch", "train_ddp_multinode.sbatch"} <= names
    assert "train_folds_array.sbatch" in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash_and_uses_real_options(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    options = _command_options()
    calls = _slidemil_calls(script.read_text(encoding="utf-8"))
    assert calls, f"{script.name} runs no slidemil command"
    for command, *tokens in calls:
        assert command in options, f"{script.name}: no command 'slidemil {command}'"
        for token in tokens:
            flag = token.split("=", 1)[0]
            if flag.startswith("--"):
                assert flag in options[command], f"{script.name}: slidemil {command} has no {flag}"
