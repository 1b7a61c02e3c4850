"""Writing an artifact folder atomically: build it in a hidden staging folder beside it, then swap it in.

`spexport convert` builds a new artifact this way, and `spexport add` / `remove` an updated copy of one,
so a failure, Ctrl-C or SIGTERM part-way leaves the artifact that was there intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
        return staging, made
    except OSError as e:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise OutputError(f"cannot create {output} ({e})") from None


def replace_artifact(staging: Path, output: Path) -> None:
    """Move the finished artifact into place; an old one is swapped out, then removed."""
    if not output.exists():
        staging.rename(output)
        return
    trash = output.with_name(f".{output.name}.old-{os.getpid()}")
    output.rename(trash)
    try:
        staging.rename(output)
    except BaseException:
        trash.rename(output)
        raise
    try:
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:  # Ctrl-C: the new artifact is in place; finish removing the old one, then stop
        shutil.rmtree(trash, ignore_errors=True)
        raise
