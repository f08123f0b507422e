"""The public API: every name in ``slidemil`` is the function or class it documents."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import slidemil


def test_names_stay_functions_after_every_submodule_is_imported():
    # A subpackage named like an API function (e.g. slidemil.synth) would replace the function
    # as an attribute of the package once imported; no stage may be shadowed that way.
    for module in pkgutil.walk_packages(slidemil.__path__, "slidemil."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    for name in slidemil.__all__:
        value = getattr(slidemil, name)
        assert not inspect.ismodule(value), f"slidemil.{name} is a module"
        if name != "__version__":
            assert callable(value), f"slidemil.{name} is not callable"


def test_import_and_help_stay_light():
    # `import slidemil` and `slidemil --help` must not pull in torch (seconds on a cold node).
    code = (
        "import sys, slidemil\nfrom slidemil.cli import commands\nprint('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
