"""Writers of one artifact take turns: `add`, `remove` and `reseal` hold an exclusive lock beside the folder
while they build and swap, so a second writer waits for the first and builds on its result instead of
overwriting it. Each staging folder is locked by the process building it, so the next writer can tell a
staging folder left by a killed writer (nobody holds its lock) from one still being built, and removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path

from spexport.errors import OutputError

WAIT_S = 300.0  # how long a second writer waits for the first
POLL_S = 0.05

_held: dict[str, int] = {}  # staging folder -> the open descriptor that holds its lock


def lock_path(folder: Path) -> Path:
    """The lock file of the artifact at `folder`: beside it, since the folder itself is swapped."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def editing(folder: str | Path, wait_s: float = WAIT_S):
    """Hold the artifact's writer lock (waiting up to `wait_s` for another writer), and clear the staging
    folders that killed writers left beside it. The lock file is removed on release."""
    folder = Path(folder)
    fd = _locked(folder, time.monotonic() + wait_s, wait_s)
    try:
        remove_stale_staging(folder)
        yield
    finally:
        # unlink while holding it: a writer that opened the old file finds it gone and opens a new one
        with contextlib.suppress(OSError):
            os.unlink(lock_path(folder))
        os.close(fd)


def _locked(folder: Path, deadline: float, wait_s: float) -> int:
    path = lock_path(folder)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(f"cannot lock {folder} for editing ({e.strerror}: {path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise OutputError(f"another spexport add, remove or reseal has been editing {folder} for over "
                                  f"{wait_s:g} s; try again when it has finished") from None
            time.sleep(POLL_S)
            continue
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed this file as it let go: lock the current one


def hold_staging(staging: Path) -> None:
    """Lock a staging folder for as long as this process lives (or until `release_staging`)."""
    try:
        fd = os.open(staging, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # without the lock, the folder merely looks stale to a later writer that holds the artifact's lock
    _held[str(staging)] = fd


def release_staging(staging: Path) -> None:
    fd = _held.pop(str(staging), None)
    if fd is not None:
        os.close(fd)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders beside `folder` whose builder has died (their lock is free)."""
    removed = []
    for candidate in folder.parent.glob(f".{folder.name}.*.partial"):
        if str(candidate) in _held or not candidate.is_dir():
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its builder is alive
        else:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        finally:
            os.close(fd)
    return removed
