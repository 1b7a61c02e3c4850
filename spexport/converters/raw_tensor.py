"""A bare prompt tensor from another trainer (say NeMo p-tuning), as .npy or .safetensors.

[n_virtual, hidden] behaves exactly like a PEFT prompt-tuning adapter holding the same tensor;
[layers, 2, kv_heads, n_virtual, head_dim] is taken as a ready KV prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import SoftPrompt, check_fits, read_safetensors
from spexport.errors import AdapterError

SUFFIXES = {".npy", ".safetensors"}


def read(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)  # a pickled object array would run code
        except (ValueError, OSError) as e:
            raise AdapterError(f"{path}: not a plain .npy tensor ({e})") from None
    tensors = read_safetensors(path)
    if len(tensors) != 1 and "prompt_embeddings" not in tensors:
        raise AdapterError(f"{path}: holds {len(tensors)} tensors; expected one prompt tensor")
    return tensors.get("prompt_embeddings", next(iter(tensors.values())))


def convert(path: Path, model: ModelInfo) -> SoftPrompt:
    tensor = np.asarray(read(path), np.float32)
    if tensor.ndim == 2:
        check_fits("prompt width (hidden size)", tensor.shape[1], model.hidden_size)
        return SoftPrompt("PROMPT_TUNING", "embeddings", tensor)
    if tensor.ndim == 5:
        expected = [model.num_layers, 2, model.num_kv_heads, tensor.shape[3], model.head_dim]
        if list(tensor.shape) != expected:
            raise AdapterError(f"KV prefix shape {list(tensor.shape)} does not fit the model: expected "
                               f"[layers, 2, kv_heads, n, head_dim] = {expected}")
        return SoftPrompt("KV_PREFIX", "kv", tensor)
    raise AdapterError(f"{path}: tensor of shape {list(tensor.shape)} is neither a prompt [n_virtual, hidden] "
                       f"nor a KV prefix [layers, 2, kv_heads, n_virtual, head_dim]")
