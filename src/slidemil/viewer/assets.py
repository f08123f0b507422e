"""The viewer's front-end assets: built from the npm registry at install time, shipped in the wheel.

Layout::

    viewer/frontend/           committed: package.json, package-lock.json (pinned), our HTML/JS/CSS
    viewer/static/             built, not committed: our files + vendor/openseadragon/ from npm

:func:`build_assets` runs ``npm ci`` in ``frontend/`` and copies what the browser needs into
``static/``; ``setup.py`` calls it from the setuptools build (wheel, sdist install and editable
install alike), and ``python -m slidemil.viewer.assets`` runs it by hand. This module uses the
standard library only, because the build loads it before slidemil's dependencies exist.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
FRONTEND_DIR = PACKAGE_DIR / "frontend"
STATIC_DIR = PACKAGE_DIR / "static"

# Our own files, copied as they are; OpenSeadragon's build output and licence go to vendor/.
OWN_FILES = ("list.html", "slide.html", "list.js", "slide.js", "style.css")
OPENSEADRAGON_BUILD = Path("node_modules") / "openseadragon" / "build" / "openseadragon"
OPENSEADRAGON_FILES = ("openseadragon.min.js",)
VENDOR_DIR = Path("vendor") / "openseadragon"
# static/.build-stamp: the hash of everything the build read, so an unchanged rebuild is free.
BUILD_STAMP = ".build-stamp"
REQUIRED = (*OWN_FILES, str(VENDOR_DIR / "openseadragon.min.js"))
BUILD_HELP = (
    "the viewer's assets are built from the npm registry when slidemil is installed: install "
    "Node.js >= 18 with npm, then reinstall slidemil (pip install .) or run "
    "`python -m slidemil.viewer.assets`"
)


class AssetBuildError(RuntimeError):
    """``npm`` is missing or failed; the message says what to install or fix."""


def missing_assets(static_dir: Path = STATIC_DIR) -> list[str]:
    """Files the viewer needs that ``static_dir`` lacks (empty when the build ran)."""
    return [name for name in REQUIRED if not (static_dir / name).is_file()]


def build_assets(
    frontend_dir: Path = FRONTEND_DIR, static_dir: Path = STATIC_DIR, *, force: bool = False
) -> bool:
    """``npm ci`` in ``frontend_dir``, then our files and OpenSeadragon into ``static_dir``.

    Returns False when ``static_dir`` was already built from the same sources (nothing done).
    Raises :class:`AssetBuildError` when npm is missing or fails."""
    frontend_dir, static_dir = Path(frontend_dir), Path(static_dir)
    stamp = _source_hash(frontend_dir)
    stamp_file = static_dir / BUILD_STAMP
    if not force and not missing_assets(static_dir) and _read(stamp_file) == stamp:
        return False
    npm = shutil.which("npm")
    if npm is None:
        if not force and not missing_assets(static_dir):
            return False  # built before (an sdist ships them): usable as they are
        raise AssetBuildError(f"npm not found on PATH; {BUILD_HELP}")
    command = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--silent"]
    try:
        subprocess.run(command, cwd=frontend_dir, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise AssetBuildError(f"`npm ci` failed in {frontend_dir}: {e}; {BUILD_HELP}") from e
    # a fresh folder next to the final one, renamed over it: a half-built static/ never shows
    staging = static_dir.with_name(static_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    vendor = staging / VENDOR_DIR
    vendor.mkdir(parents=True)
    for name in OWN_FILES:
        shutil.copy2(frontend_dir / name, staging / name)
    built = frontend_dir / OPENSEADRAGON_BUILD
    for name in OPENSEADRAGON_FILES:
        shutil.copy2(built / name, vendor / name)
    shutil.copytree(built / "images", vendor / "images")
    shutil.copy2(built.parent.parent / "LICENSE.txt", vendor / "LICENSE.txt")
    (staging / BUILD_STAMP).write_text(stamp, encoding="utf-8")
    shutil.rmtree(static_dir, ignore_errors=True)
    staging.rename(static_dir)
    return True


def _source_hash(frontend_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json", *OWN_FILES):
        digest.update(name.encode())
        digest.update((frontend_dir / name).read_bytes())
    return digest.hexdigest()


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main() -> int:
    """``python -m slidemil.viewer.assets``: build (or rebuild with ``--force``) the assets."""
    try:
        built = build_assets(force="--force" in sys.argv[1:])
    except AssetBuildError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    sys.stdout.write(f"viewer assets {'built' if built else 'up to date'} in {STATIC_DIR}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
