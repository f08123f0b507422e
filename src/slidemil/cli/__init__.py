"""The ``slidemil`` command line: a thin layer over the Python API.

Each command lives in its own module, imports its stage only when run (so ``--help`` is
instant), and turns a :class:`~slidemil.errors.SlidemilError` into one red line and exit code 2.
"""

from slidemil.cli.app import app, main

__all__ = ["app", "main"]
