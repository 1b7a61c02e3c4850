"""Helpers for tests that damage artifacts and inputs and check how spexport refuses them."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from click.testing import CliRunner

from spexport.artifact.manifest import MANIFEST, seal
from spexport.cli import main


def one_line(message: str) -> None:
    assert message.strip() and "\n" not in message.strip() and "Traceback" not in message, message


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ends_cleanly(result, pattern: str | None = None) -> None:
    """The command ended on its own terms: nothing escaped, and an error is one `error:` line on stderr
    (or click's usage message for an option it refused, exit code 2)."""
    assert result.exc_info is None or result.exc_info[0] is SystemExit, result.exc_info
    usage = result.exit_code == 2 and re.search(r"(^|\n)Error: ", result.stderr)
    if result.exit_code and not usage:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        one_line(result.stderr)
    if pattern:
        assert re.search(pattern, result.stderr), result.stderr


def copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def rehash(folder: Path, *rels: str) -> None:
    """Record the current sha256 of files changed on purpose, so only what is tested can fail."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel in rels:
        manifest["files"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(seal(manifest)))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
