"""Lock files that keep processes sharing a work folder off each other's slides.

A second ``extract`` started by mistake, overlapping SLURM shards or two nodes on one network
folder must never compute one slide twice or delete each other's temporary files; the runner
(:mod:`slidemil.runner`) takes a slide's lock before it works on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_HEARTBEAT_SECONDS = 30.0  # how often a held lock is touched
LOCK_STALE_SECONDS = 600.0  # a lock untouched this long belongs to a dead process
LOCK_POLL_SECONDS = 0.05
UNREADABLE_LOCK_SECONDS = 10.0  # an unreadable lock this old is taken over
FOLDER_RACE_ATTEMPTS = 10  # tries to make the lock folder while finishing processes remove it


class SlideLocks:
    """Per-slide lock files in one folder, so processes sharing a work folder never compute the
    same slide twice.

    A lock is created with ``O_CREAT | O_EXCL`` (atomic, on network file systems too) and holds
    the owner's host, pid and a random token. While held, a heartbeat thread touches it every
    :data:`LOCK_HEARTBEAT_SECONDS`. A lock is *stale*, and taken over, when its owner's pid is
    not alive on this host, or when it has not been touched for :data:`LOCK_STALE_SECONDS`
    (an owner on another host that died).
    """

    def __init__(self, folder: Path, stage: str):
        self.folder, self.stage = Path(folder), stage
        self.held: dict[str, str] = {}  # name -> token
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.lock"

    def acquire(self, name: str, wait: float = 0.0) -> bool:
        """Take the lock ``name``; ``False`` when a live process holds it (after ``wait`` s)."""
        if name in self.held:
            return True
        deadline = time.monotonic() + wait
        while True:
            if self._create(name) or (self._take_over_if_stale(name) and self._create(name)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL_SECONDS)

    def release(self, name: str) -> None:
        """Remove the lock ``name`` if this object still owns it (not taken over meanwhile)."""
        token = self.held.pop(name, None)
        if token is not None and (_read_lock(self.path(name)) or {}).get("token") == token:
            self.path(name).unlink(missing_ok=True)

    def release_all(self) -> None:
        """Release every held lock, stop the heartbeat, and drop the folder when it is empty."""
        self._stop.set()
        for name in list(self.held):
            self.release(name)
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # fails while another process holds a lock: fine

    def start_heartbeat(self) -> None:
        """Touch every held lock every :data:`LOCK_HEARTBEAT_SECONDS` until :meth:`release_all`."""

        def beat() -> None:
            while not self._stop.wait(LOCK_HEARTBEAT_SECONDS):
                for name in list(self.held):
                    with contextlib.suppress(OSError):
                        os.utime(self.path(name))

        self._thread = threading.Thread(target=beat, name="slidemil-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create(self, name: str) -> bool:
        token = uuid.uuid4().hex
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                 "stage": self.stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        # The lock appears with its owner already in it: written to a file of this process's
        # own, then hard-linked to the lock's name (which fails if the name exists). A lock
        # created empty and filled afterwards would, if the process were killed in between,
        # stay unreadable, and an unreadable lock counts as just created for LOCK_STALE_SECONDS.
        # A process that finishes removes the empty folder (release_all), so it may vanish
        # between making it and locking in it, or even inside mkdir: make it again.
        for attempt in range(FOLDER_RACE_ATTEMPTS):
            with contextlib.suppress(FileExistsError):  # made and removed meanwhile: retried
                self.folder.mkdir(parents=True, exist_ok=True)
            draft = self.folder / f".{name}.lock.{token}"
            try:
                draft.write_text(json.dumps(owner), encoding="utf-8")
                os.link(draft, self.path(name))
                break
            except FileExistsError:
                return False
            except FileNotFoundError:
                if attempt == FOLDER_RACE_ATTEMPTS - 1:
                    raise
            finally:
                draft.unlink(missing_ok=True)
        self.held[name] = token
        return True

    def _take_over_if_stale(self, name: str) -> bool:
        """Remove the lock ``name`` when it is stale; True when it was (or is gone already)."""
        path = self.path(name)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        owner = _read_lock(path)
        if not _is_stale(owner, age):
            return False
        # Move it aside first: of several processes judging it stale, one moves it; and if the
        # file moved is not the one judged (a new owner took it meanwhile), it goes back.
        aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            path.replace(aside)
        except FileNotFoundError:
            return True
        moved = _read_lock(aside)
        if (moved or {}).get("token") != (owner or {}).get("token"):
            with contextlib.suppress(OSError):
                os.link(aside, path)  # fails if yet another process has locked it: fine too
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        log.warning("took over the stale lock of %s (%s)", name, _describe_owner(owner))
        return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # gone, or being written by its creator this very moment
    return owner if isinstance(owner, dict) else None


def _is_stale(owner: dict[str, Any] | None, age_seconds: float) -> bool:
    if age_seconds > LOCK_STALE_SECONDS:
        return True
    if owner is None:  # locks appear whole, so only a damaged (or old-version) one is unreadable
        return age_seconds > UNREADABLE_LOCK_SECONDS
    if owner.get("host") != socket.gethostname():
        return False  # another host's: only its age can tell
    return not _pid_alive(owner.get("pid"))


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _describe_owner(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "unreadable owner"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('time')}"
