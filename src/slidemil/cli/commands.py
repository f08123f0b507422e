"""Imports every command module so each registers itself on the app."""

from slidemil.cli.command_index import register

register()
