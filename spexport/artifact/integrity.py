"""Every artifact file against its manifest sha256, and manifest paths kept inside the folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from spexport.errors import ArtifactError


def inside_folder(folder: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing any that escapes the artifact folder."""
    root = Path(folder).resolve()
    try:
        path = (root / rel).resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system, a symlink loop
        path = None
    if path is None or root != path and root not in path.parents:
        raise ArtifactError(f"{folder}: manifest path {rel!r} points outside the artifact")
    return path


OK, DAMAGED, MISSING = "ok", "DAMAGED", "missing"


def file_status(folder: Path, files: dict[str, str],
                intact: Callable[[Path, str], bool] = lambda path, digest: sha256(path) == digest) -> dict[str, str]:
    """ok, DAMAGED or missing for every file of `files` (a manifest's path -> sha256), checked against its
    sha256 (`intact` may know a file is intact without hashing it again)."""
    status = {}
    for rel, digest in files.items():
        path = inside_folder(folder, rel)
        status[rel] = MISSING if not _is_file(path) else OK if intact(path, digest) else DAMAGED
    return status


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system names no file
        return False


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
