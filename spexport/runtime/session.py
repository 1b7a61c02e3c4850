"""Opening an artifact: manifest, integrity, ONNX Runtime session, prompt bank, tokenizer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spexport import tensorfile
from spexport.errors import ArtifactError
from spexport.manifest import DAMAGED, MISSING, Manifest, file_status, inside_folder


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Refuse an artifact whose files are missing or differ from what the exporter wrote."""
    for rel, status in file_status(folder, manifest).items():
        if status == MISSING:
            raise ArtifactError(f"{folder}: {rel} is missing")
        if status == DAMAGED:
            raise ArtifactError(f"{folder}: {rel} is damaged or was replaced (sha256 differs from the manifest)")


def pick_providers(requested: list[str] | None) -> list[str]:
    """The requested execution providers that this machine has, CPU last as the fallback."""
    available = ort.get_available_providers()
    chosen = []
    for provider in requested or ["CPUExecutionProvider"]:
        if provider in available:
            chosen.append(provider)
        else:
            warnings.warn(f"ONNX Runtime provider {provider} is not available here; falling back to "
                          f"CPUExecutionProvider (available: {', '.join(available)})", stacklevel=3)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def open_session(path: Path, providers: list[str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # ORT raises its own pybind types for unreadable graphs
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None


def load_bank(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    bank = tensorfile.load(inside_folder(folder, manifest.prompt_bank))
    for task in manifest.tasks:
        tensor = bank.get(task.tensor)
        if tensor is None or list(tensor.shape) != task.shape:
            raise ArtifactError(f"{folder}: prompt bank entry for task {task.name!r} is missing or misshapen")
    return bank


def load_tokenizer(folder: Path, manifest: Manifest):
    if "tokenizer.json" not in manifest.tokenizer_files:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(inside_folder(folder, "tokenizer.json")))
