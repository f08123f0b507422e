"""Which module defines each command, so ``slidemil <command>`` imports only that module.

A run of ``slidemil patch`` then does not pay for importing training, the demo or the viewer;
``--help`` and an unknown command import them all (each module adds itself to ``app``).
"""

from __future__ import annotations

import importlib

# command name -> the module that defines it (each module adds itself to ``app``)
COMMAND_MODULES = {
    "synth": "slidemil.cli.synth_command",
    "patch": "slidemil.cli.patch_command",
    "extract": "slidemil.cli.extract_command",
    "train": "slidemil.cli.train_command",
    "evaluate": "slidemil.cli.evaluate_command",
    "predict": "slidemil.cli.predict_command",
    "heatmap": "slidemil.cli.heatmap_command",
    "view": "slidemil.cli.view_command",
    "export": "slidemil.cli.export_command",
    "sweep": "slidemil.cli.sweep_command",
    "encoders": "slidemil.cli.encoders_command",
    "demo": "slidemil.cli.demo_command",
}


def register(names: list[str] | None = None) -> None:
    """Import the modules of ``names`` (every command when ``None``)."""
    for name in COMMAND_MODULES if names is None else names:
        importlib.import_module(COMMAND_MODULES[name])


def invoked_command(argv: list[str]) -> str | None:
    """The command ``argv`` (without the program) runs, when it names one: the first word
    that is not a root option. ``None`` for ``--help``, no command or an unknown one."""
    for word in argv:
        if word in ("--verbose", "-v"):
            continue
        return word if word in COMMAND_MODULES else None
    return None
