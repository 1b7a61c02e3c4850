"""Prompt ensembles in an artifact: named groups of tasks trained for the same job, run together.

`--ensemble NAME=a,b,c` specs are parsed here for `convert` and `add`; `edit_ensembles` adds or removes
ensembles of an existing artifact by rewriting its sealed manifest alone (atomically: a reader sees the
old manifest or the new one). The checks on a group (at least two distinct members that are tasks, a name
that is no task's) are `manifest.ensemble_problem`, shared with the manifest reader.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from spexport.artifact.manifest import MANIFEST, Manifest, Task, ensemble_problem
from spexport.errors import ArtifactError, InputError, OptionError
from spexport.runtime.session import verify_files

SPEC_EXAMPLE = "--ensemble sentiment=sentiment_a,sentiment_b,sentiment_c"


def parse_specs(values: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """{name: members} from `NAME=task_a,task_b,...` specs; a malformed or repeated one raises OptionError."""
    ensembles: dict[str, list[str]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        members = [m.strip() for m in rest.split(",")]
        if not sep or not name.strip() or not all(members):
            raise OptionError(f"--ensemble {value!r} is not NAME=TASK,TASK,..., e.g. {SPEC_EXAMPLE}")
        if name.strip() in ensembles:
            raise OptionError(f"--ensemble {name.strip()!r} is given twice; give each ensemble once")
        ensembles[name.strip()] = members
    return ensembles


def check_ensembles(ensembles: dict[str, list[str]], tasks: list[Task]) -> None:
    """Refuse ensembles that an artifact of `tasks` cannot hold, with the first problem as an OptionError."""
    for name, members in ensembles.items():
        problem = ensemble_problem(name, members, tasks)
        if problem:
            raise OptionError(f"--ensemble {name}: {problem}")


def needed_by(ensembles: dict[str, list[str]], task: str) -> str | None:
    """The name of an ensemble that has `task` among its members, or None."""
    return next((name for name, members in ensembles.items() if task in members), None)


def refuse_removing_members(ensembles: dict[str, list[str]], tasks: list[str]) -> None:
    """InputError naming the ensemble when one of `tasks` is a member of one."""
    for task in tasks:
        name = needed_by(ensembles, task)
        if name is not None:
            raise InputError(f"task {task!r} is a member of ensemble {name!r} ({', '.join(ensembles[name])}); "
                             f"remove the ensemble first (--ensemble {name})")


def edit_ensembles(folder: str | Path, add: dict[str, list[str]] | None = None, remove: list[str] = (),
                   replace: bool = False) -> Manifest:
    """Add the ensembles `add` ({name: members}) to the artifact at `folder` and remove those named in
    `remove`; an ensemble of the same name is refused unless `replace`. Only spexport.json changes."""
    folder = Path(folder)
    manifest = Manifest.read(folder)
    verify_files(folder, manifest)  # the new seal vouches for the artifact as it stands
    ensembles = edited(folder, manifest.ensembles, manifest.tasks, add, remove, replace)
    updated = dataclasses.replace(manifest, ensembles=ensembles)
    _write_manifest(folder, updated)
    return updated


def edited(folder: Path, ensembles: dict[str, list[str]], tasks: list[Task],
           add: dict[str, list[str]] | None = None, remove: list[str] = (), replace: bool = False
           ) -> dict[str, list[str]]:
    """`ensembles` without those named in `remove` and with those of `add`, checked against `tasks`."""
    check_ensembles(add or {}, tasks)
    ensembles = dict(ensembles)
    for name in remove:
        if name not in ensembles:
            have = ", ".join(ensembles) or "none"
            raise InputError(f"{folder} has no ensemble {name!r}; its ensembles: {have}")
        del ensembles[name]
    for name, members in (add or {}).items():
        if name in ensembles and not replace:
            raise InputError(f"{folder} already has an ensemble {name!r} ({', '.join(ensembles[name])}); pass "
                             "--replace to replace it, or pick another name")
        ensembles[name] = list(members)
    return ensembles


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    path = folder / MANIFEST
    temporary = path.with_name(f".{MANIFEST}.{os.getpid()}.ensembles")
    try:
        temporary.write_text(manifest.text())
        temporary.replace(path)
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise ArtifactError(f"{path}: cannot write the updated manifest ({e.strerror}); the artifact is unchanged") \
            from None
