"""What every converter shares: the canonical `SoftPrompt` and checks against the base model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spexport.errors import AdapterError


@dataclass
class SoftPrompt:
    """A task's prompt in canonical form.

    kind "embeddings": `tensor` is [n_virtual, hidden], fed where token embeddings go.
    kind "kv": `tensor` is [layers, 2, kv_heads, n_virtual, head_dim], keys and values per layer.
    """

    method: str
    kind: str
    tensor: np.ndarray
    source: dict = field(default_factory=dict)  # where it came from, for the manifest

    @property
    def num_virtual_tokens(self) -> int:
        return self.tensor.shape[0] if self.kind == "embeddings" else self.tensor.shape[3]


def prompt_weights(config: dict, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The saved `prompt_embeddings` (PEFT stores the prompt encoder's output, not its weights)."""
    if "prompt_embeddings" not in weights:
        raise AdapterError(f"no 'prompt_embeddings' tensor (found {sorted(weights)[:5]})")
    tensor = np.asarray(weights["prompt_embeddings"], dtype=np.float32)
    n_virtual = config["num_virtual_tokens"]
    submodules = config.get("num_transformer_submodules") or 1
    if tensor.ndim != 2 or tensor.shape[0] != n_virtual * submodules:
        raise AdapterError(f"prompt_embeddings has shape {list(tensor.shape)}, expected "
                           f"[{n_virtual} * {submodules}, ...] for num_virtual_tokens={n_virtual}")
    return tensor


def check_fits(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise AdapterError(f"trained for another base model: {what} is {got}, the model has {expected}")
