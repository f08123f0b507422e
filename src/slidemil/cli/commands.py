"""Imports every command module so each registers itself on the app."""

from slidemil.cli import (  # noqa: F401
    encoders_command,
    evaluate_command,
    extract_command,
    patch_command,
    synth_command,
    train_command,
)
