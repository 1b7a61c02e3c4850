"""Writing an artifact folder atomically: build it in a hidden staging folder beside it, then swap it in.

`spexport convert` builds a new artifact this way, and `spexport add` / `remove` an updated copy of one,
so a failure, Ctrl-C or SIGTERM part-way leaves the artifact that was there intact.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from spexport.artifact.locks import hold_staging, release_staging
from spexport.errors import OutputError


def staging_folder(output: Path) -> tuple[Path, Path | None]:
    """A hidden folder beside `output` to build in, and the top-most parent folder created for it."""
    made = next((p for p in reversed(output.parents) if not p.exists()), None)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the artifact from other users, e.g. a server's
        hold_staging(staging)  # a later writer removes it only once this process is gone
        return staging, made
    except OSError as e:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise OutputError(f"cannot create {output} ({e})") from None


def replace_artifact(staging: Path, output: Path) -> None:
    """Move the finished artifact into place. An old one is exchanged with it in one step, so `output`
    always holds a whole artifact, and is then removed from where the new one was built."""
    release_staging(staging)
    if not output.exists():
        staging.rename(output)
        return
    old = staging
    if not exchange(staging, output):
        # No atomic exchange here: for the instant between two renames, the old artifact waits under a
        # name the user sees, never a hidden one.
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        output.rename(old)
        try:
            staging.rename(output)
        except BaseException:
            old.rename(output)
            raise
    try:
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # Ctrl-C: the new artifact is in place; finish removing the old one, then stop
        shutil.rmtree(old, ignore_errors=True)
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2, macOS renamex_np); False where the platform
    or the file system offers no such step."""
    libc = ctypes.CDLL(None, use_errno=True)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_cwd, rename_exchange = -100, 2
        failed = libc.renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        failed = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if not failed:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
