"""`spexport add` and `spexport remove`: change a decoder or seq2seq artifact's tasks in place, without torch.

The updated artifact is built in a staging folder beside it: the graphs, weights, tokenizer and the
adapter files of unchanged tasks are hard links (copies where the file system has none), the prompt
bank, the new tasks' adapter files and the manifest are written anew and sealed, and the folder is
swapped in at the end. A failure, Ctrl-C or SIGTERM before the swap leaves the old artifact as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from spexport.artifact import ort_adapters, tensorfile
from spexport.artifact.files import CHAT_TEMPLATE
from spexport.artifact.folders import replace_artifact, staging_folder
from spexport.artifact.integrity import inside_folder, sha256
from spexport.artifact.locks import editing, release_staging
from spexport.artifact.manifest import MANIFEST, Manifest, Task
from spexport.ensembles import edit_ensembles, edited, refuse_removing_members
from spexport.errors import AdapterError, InputError, OutputError
from spexport.families import family_named
from spexport.runtime.chat import check_template_file
from spexport.runtime.prefix import check_editable, new_tasks
from spexport.runtime.session import verify_files, vouch_for
from spexport.signing import SIGNATURE, signature_dropped


def add_tasks(folder: str | Path, adapters: list[tuple[str, Path]], replace: bool = False,
              providers: list[str] | None = None, sign_key: str | Path | None = None,
              ensembles: dict[str, list[str]] | None = None) -> Manifest:
    """Add the tasks of `adapters` ([(NAME, PATH)], as `convert --adapter`) to the artifact at `folder`,
    and the prompt `ensembles` ({name: member tasks}, new tasks among them) in the same update.

    A name the artifact already has is refused unless `replace`; a replaced task keeps its task id. A second
    writer of the same artifact waits for this one (artifact.locks). A signed artifact is signed again with
    `sign_key`, or loses its signature with a warning.
    """
    folder = Path(folder)
    with editing(folder):
        return _signed_again(folder, sign_key, lambda: _add(folder, adapters, replace, providers, ensembles))


def _add(folder: Path, adapters: list[tuple[str, Path]], replace: bool, providers, ensembles) -> Manifest:
    manifest = _open(folder)
    added = new_tasks(folder, manifest, adapters, providers)
    tasks, bank = list(manifest.tasks), _bank(folder, manifest)
    index = {t.name: i for i, t in enumerate(tasks)}
    folded = {t.name.lower(): t.name for t in tasks}
    for task, kv in added:
        other = folded.get(task.name.lower(), task.name)
        if other != task.name:
            raise AdapterError(f"task names {other!r} and {task.name!r} differ only in case, so their files would be "
                               "one on macOS and Windows; rename one")
        if task.name in manifest.ensembles:
            raise AdapterError(f"{folder} has an ensemble named {task.name!r}; a task needs a name of its own")
        if task.name in index and not replace:
            raise AdapterError(f"{folder} already has a task {task.name!r}; pass --replace (replace=True) to "
                               "replace it, or pick another name")
        if task.name in index:
            del bank[tasks[index[task.name]].tensor]
            tasks[index[task.name]] = task
        else:
            tasks.append(task)
        bank[task.tensor] = kv
    written = {t.name: kv for t, kv in added} if family_named(manifest.family, folder).adapter_files else {}
    groups = edited(folder, manifest.ensembles, tasks, ensembles, replace=replace)
    return _rewrite(folder, dataclasses.replace(manifest, ensembles=groups), tasks, bank, written)


def remove_tasks(folder: str | Path, names: list[str], sign_key: str | Path | None = None,
                 ensembles: list[str] = ()) -> Manifest:
    """Remove the named tasks from the artifact at `folder`; later tasks' ids move down by one per removal.
    A task that an ensemble has among its members is refused unless that ensemble is removed too (`ensembles`).
    Locking and signing as `add_tasks`."""
    folder = Path(folder)
    with editing(folder):
        return _signed_again(folder, sign_key, lambda: _remove(folder, names, ensembles))


def change_ensembles(folder: str | Path, add: dict[str, list[str]] | None = None, remove: list[str] = (),
                     replace: bool = False, sign_key: str | Path | None = None) -> Manifest:
    """Add or remove ensembles alone (only spexport.json changes), under the writer lock; a signature is signed
    again with `sign_key`, or removed with a warning, as with `add_tasks`."""
    folder = Path(folder)

    def edit() -> Manifest:
        manifest = edit_ensembles(folder, add, remove, replace)
        (folder / SIGNATURE).unlink(missing_ok=True)  # it vouched for the manifest that was just replaced
        return manifest

    with editing(folder):
        return _signed_again(folder, sign_key, edit)


def _signed_again(folder: Path, sign_key, edit) -> Manifest:
    had_signature = (folder / SIGNATURE).is_file()
    manifest = edit()
    signature_dropped(folder, had_signature, sign_key)
    return manifest


def _remove(folder: Path, names: list[str], ensembles) -> Manifest:
    manifest = _open(folder)
    manifest = dataclasses.replace(manifest, ensembles=edited(folder, manifest.ensembles, manifest.tasks,
                                                              remove=ensembles))
    have = [t.name for t in manifest.tasks]
    unknown = [n for n in names if n not in have]
    if unknown:
        raise InputError(f"{folder} has no task {unknown[0]!r}; its tasks are {', '.join(have)}")
    refuse_removing_members(manifest.ensembles, names)
    tasks = [t for t in manifest.tasks if t.name not in names]
    if not tasks:
        raise InputError(f"removing {', '.join(names)} would leave {folder} without tasks; an artifact keeps at "
                         "least one")
    bank = _bank(folder, manifest)
    return _rewrite(folder, manifest, tasks, {t.tensor: bank[t.tensor] for t in tasks}, written={})


def _open(folder: Path) -> Manifest:
    manifest = Manifest.read(folder)
    check_editable(folder, manifest)
    verify_files(folder, manifest)  # nothing damaged is carried into the updated artifact
    if CHAT_TEMPLATE in manifest.files:
        check_template_file(folder)
    return manifest


def _bank(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    bank = tensorfile.load(inside_folder(folder, manifest.prompt_bank))
    return {t.tensor: bank[t.tensor] for t in manifest.tasks}


def _rewrite(folder: Path, manifest: Manifest, tasks: list[Task], bank: dict[str, np.ndarray],
             written: dict[str, np.ndarray]) -> Manifest:
    """Build the artifact with `tasks`, `bank` and the adapter files of `written` beside `folder`, then swap."""
    adapters = {ort_adapters.adapter_path(t.name) for t in tasks}
    fresh = {manifest.prompt_bank, *(ort_adapters.adapter_path(name) for name in written)}
    kept = {rel: digest for rel, digest in manifest.files.items()
            if rel not in fresh and (rel in adapters or not rel.startswith(ort_adapters.FOLDER + "/"))}
    staging, _ = staging_folder(folder)
    try:
        for rel in kept:
            _link(inside_folder(folder, rel), staging / rel)
        tensorfile.save(bank, staging / manifest.prompt_bank)
        ort_adapters.write_adapters(written, staging)
        files = {**kept, **{rel: sha256(staging / rel) for rel in fresh}}
        updated = dataclasses.replace(manifest, tasks=tasks, files=dict(sorted(files.items())))
        updated.write(staging)
        Manifest.read(staging)  # what the runtime would refuse must fail here, not at the next load
        replace_artifact(staging, folder)
    except BaseException as e:
        release_staging(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"updating {folder} failed ({e}); the artifact is unchanged") from e
        raise
    vouch_for(folder, kept)  # verified before they were linked: the next load need not hash them again
    return updated


def _link(source: Path, target: Path) -> None:
    """A hard link to an unchanged file (nothing writes it in place: updates write new files), else a copy."""
    if target.name == MANIFEST:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
