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

from spexport.artifact.manifest import Manifest
from spexport.errors import ArtifactError, InputError
from spexport.families import family_named
from spexport.runtime.decoder import DecoderModel
from spexport.runtime.encoder import EncoderModel
from spexport.runtime.inputs import MAX_BATCH_SIZE, is_whole
from spexport.runtime.seq2seq import Seq2SeqModel
from spexport.runtime.session import pick_providers, release_freed_memory, verify_files


def load(folder: str | Path, providers: list[str] | None = None, verify: bool = True,
         max_batch_size: int = MAX_BATCH_SIZE) -> DecoderModel | EncoderModel | Seq2SeqModel:
    """Open an artifact folder written by `spexport convert`: a DecoderModel, EncoderModel or Seq2SeqModel.

    providers: ONNX Runtime execution providers in order of preference (default CPU); any that
    this machine lacks is dropped with a warning. verify: check every file's sha256 first (a file
    verified before and not written since is not read again). max_batch_size: the most rows one
    call may send; a larger batch is refused before anything is allocated for it.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"folder must be the path of an artifact folder, got {folder!r}")
    if not is_whole(max_batch_size) or max_batch_size < 1:
        raise InputError(f"max_batch_size must be a whole number >= 1, got {max_batch_size!r}")
    if providers is not None and (isinstance(providers, str) or not isinstance(providers, (list, tuple))
                                  or not all(isinstance(p, str) for p in providers)):
        raise InputError(f"providers must be a list of provider names such as ['CUDAExecutionProvider'], got "
                         f"{providers!r}")
    folder = Path(folder)
    manifest = Manifest.read(folder)
    family = family_named(manifest.family, folder)
    if not family.embeddings_in_bank:
        for task in manifest.tasks:
            if len(task.shape) != 5:
                raise ArtifactError(f"{folder}: task {task.name!r} holds embeddings {task.shape}, which a "
                                    f"{family.display_name} artifact's bank cannot hold; export it again")
    if verify:
        verify_files(folder, manifest)
    model = family.runtime(folder, manifest, pick_providers(providers), max_batch_size)
    release_freed_memory()
    return model


__all__ = ["DecoderModel", "EncoderModel", "Seq2SeqModel", "load"]
