"""Build hook: the viewer's front-end assets come from the npm registry when slidemil is built.

Everything else about the package is in pyproject.toml. ``build_py`` runs for a wheel, for an
install from the sdist and for an editable install (PEP 660) alike; before it copies package data
it runs ``npm ci`` and copies OpenSeadragon and our HTML/JS/CSS into src/slidemil/viewer/static/
(see slidemil/viewer/assets.py). Without Node.js/npm the package still builds, with a warning,
and ``slidemil view`` says how to build the assets; SLIDEMIL_REQUIRE_VIEWER=1 makes it an error.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ASSETS_MODULE = Path(__file__).resolve().parent / "src" / "slidemil" / "viewer" / "assets.py"


def _load_assets_module():
    # by file path: importing the slidemil package would need its dependencies at build time
    spec = importlib.util.spec_from_file_location("_slidemil_viewer_assets", ASSETS_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithViewerAssets(build_py):
    """``build_py`` that first builds the viewer's assets into the source tree."""

    def run(self) -> None:
        assets = _load_assets_module()
        try:
            if assets.build_assets():
                self.announce("built the viewer's assets with npm", level=2)
        except assets.AssetBuildError as e:
            if os.environ.get("SLIDEMIL_REQUIRE_VIEWER") == "1":
                raise
            sys.stderr.write(f"WARNING: slidemil's viewer will not work: {e}\n")
        # the list of package data may have been computed before the assets existed
        self.__dict__.pop("data_files", None)
        super().run()


setup(cmdclass={"build_py": BuildPyWithViewerAssets})
