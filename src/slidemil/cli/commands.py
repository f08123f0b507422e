"""Imports every command module so each registers itself on the app."""

from slidemil.cli import synth_command  # noqa: F401
