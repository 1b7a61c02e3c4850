"""The torch-free runtime: numpy + onnxruntime (+ tokenizers for the text helpers).

    from spexport.runtime import load
    m = load("artifact/")
    m.logits(input_ids, task="sentiment")
    m.generate(input_ids, task=["sentiment", "topic"], max_new_tokens=20)   # decoder and seq2seq artifacts
    m.classify(["great film"], task="sentiment")                             # encoder artifacts
"""

from __future__ import annotations

import os
from pathlib import Path

from spexport.artifact.manifest import MANIFEST, Manifest
from spexport.errors import ArtifactError, InputError
from spexport.families import family_named
from spexport.runtime.decoder import DecoderModel
from spexport.runtime.device import Provider, pick_providers
from spexport.runtime.encoder import EncoderModel
from spexport.runtime.inputs import MAX_BATCH_SIZE, is_whole
from spexport.runtime.seq2seq import Seq2SeqModel
from spexport.runtime.session import release_freed_memory, verify_files

SWAP_RETRIES = 5

def load(folder: str | Path, providers: list[Provider] | None = None, verify: bool = True,
         max_batch_size: int = MAX_BATCH_SIZE, trusted_keys: list[str | Path] | None = None
         ) -> DecoderModel | EncoderModel | Seq2SeqModel:
    """Open an artifact folder written by `spexport convert`: a DecoderModel, EncoderModel or Seq2SeqModel.

    providers: ONNX Runtime execution providers in order of preference, each a name or a (name,
    options) pair, e.g. ["CUDAExecutionProvider"] (default: the CPU). CPUExecutionProvider is appended
    last and runs the nodes the others have no kernel for; a provider this onnxruntime build lacks,
    or one that fails to start, is an InputError (docs/gpu.md). verify: check every file's sha256 first (a file
    verified before and not written since is not read again). max_batch_size: the most rows one
    call may send; a larger batch is refused before anything is allocated for it. trusted_keys: PEM
    public keys; the artifact must be signed by one of them (`spexport sign`) and unchanged since, else
    ArtifactError (needs the `[sign]` extra).
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"folder must be the path of an artifact folder, got {folder!r}")
    if not is_whole(max_batch_size) or max_batch_size < 1:
        raise InputError(f"max_batch_size must be a whole number >= 1, got {max_batch_size!r}")
    providers = pick_providers(providers)
    folder = Path(folder)
    if trusted_keys is not None:
        from spexport.signing import verify as verify_signature

        verify_signature(folder, list(trusted_keys) if not isinstance(trusted_keys, (str, Path)) else [trusted_keys])
    for attempt in range(SWAP_RETRIES):
        before = _manifest_identity(folder)
        try:
            return _open(folder, providers, verify, max_batch_size)
        except (ArtifactError, OSError):
            # `spexport add` swapped the folder while it was being read: read the new artifact whole
            if attempt == SWAP_RETRIES - 1 or _manifest_identity(folder) == before:
                raise


def _open(folder: Path, providers, verify: bool, max_batch_size: int):
    manifest = Manifest.read(folder)
    family = family_named(manifest.family, folder)
    if not family.embeddings_in_bank:
        for task in manifest.tasks:
            if len(task.shape) != 5:
                raise ArtifactError(f"{folder}: task {task.name!r} holds embeddings {task.shape}, which a "
                                    f"{family.display_name} artifact's bank cannot hold; export it again")
    if verify:
        verify_files(folder, manifest)
    model = family.runtime(folder, manifest, providers, max_batch_size)
    release_freed_memory()
    return model


def _manifest_identity(folder: Path):
    try:
        st = (folder / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_mtime_ns


__all__ = ["DecoderModel", "EncoderModel", "Seq2SeqModel", "load"]
