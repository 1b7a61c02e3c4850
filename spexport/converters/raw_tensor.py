"""A bare prompt tensor from another trainer (say NeMo p-tuning), as .npy or .safetensors.

[n_virtual, hidden] behaves exactly like a PEFT prompt-tuning adapter holding the same tensor;
[layers, 2, kv_heads, n_virtual, head_dim] is taken as a ready KV prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import SoftPrompt, check_fits, float_tensor, read_safetensors
from spexport.errors import AdapterError

SUFFIXES = {".npy", ".safetensors"}


def read(path: Path) -> tuple[str, np.ndarray]:
    """The file's prompt tensor, and what to call it in a message."""
    if path.suffix == ".npy":
        try:
            check_npy_size(path)
            return "its tensor", np.load(path, allow_pickle=False)  # a pickled object array would run code
        except (ValueError, OSError, EOFError) as e:
            raise AdapterError(f"{path}: not a plain .npy tensor ({' '.join(str(e).split())[:200]})") from None
    tensors = read_safetensors(path)
    if "prompt_embeddings" in tensors:
        return "prompt_embeddings", tensors["prompt_embeddings"]
    if len(tensors) != 1:
        raise AdapterError(f"{path}: holds {len(tensors)} tensors; expected one prompt tensor")
    return next(iter(tensors.items()))


def check_npy_size(path: Path) -> None:
    """ValueError if the .npy header promises more data than the file holds (before anything is allocated)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        promised = int(np.prod(shape, dtype=object)) * dtype.itemsize
        held = path.stat().st_size - f.tell()
    if promised != held:
        raise ValueError(f"its header promises {promised} bytes of data, the file holds {held}")


def convert(path: Path, model: ModelInfo) -> SoftPrompt:
    name, value = read(path)
    try:
        return _prompt(float_tensor(name, value), model)
    except AdapterError as e:
        raise AdapterError(f"{path}: {e}") from None


def _prompt(tensor: np.ndarray, model: ModelInfo) -> SoftPrompt:
    if tensor.ndim == 2:
        check_fits("prompt width (hidden size)", tensor.shape[1], model.hidden_size)
        prompt = SoftPrompt("PROMPT_TUNING", "embeddings", tensor)
    elif tensor.ndim == 5:
        expected = [model.num_layers, 2, model.num_kv_heads, tensor.shape[3], model.head_dim]
        if list(tensor.shape) != expected:
            raise AdapterError(f"KV prefix shape {list(tensor.shape)} does not fit the model: expected "
                               f"[layers, 2, kv_heads, n, head_dim] = {expected}")
        prompt = SoftPrompt("KV_PREFIX", "kv", tensor)
    else:
        raise AdapterError(f"tensor of shape {list(tensor.shape)} is neither a prompt [n_virtual, hidden] "
                           f"nor a KV prefix [layers, 2, kv_heads, n_virtual, head_dim]")
    if prompt.num_virtual_tokens < 1:
        raise AdapterError(f"tensor of shape {list(tensor.shape)} holds no virtual tokens")
    return prompt
