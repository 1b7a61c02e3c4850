"""What every converter shares: the canonical `SoftPrompt`, the typed adapter configs (checked on
construction, so a bad value fails where it is read), and checks against the base model."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np

from spexport.artifact import tensorfile
from spexport.errors import AdapterError, ArtifactError

MAX_COUNT = 1 << 31  # counts past int32 mean a damaged config, not a model


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


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < MAX_COUNT


def _name(value) -> bool:
    return value is None or isinstance(value, str)


@dataclass(frozen=True)
class PromptConfig:
    """The adapter_config.json fields that every soft-prompt method reads."""

    peft_type: str
    num_virtual_tokens: int
    task_type: str | None = None
    num_transformer_submodules: int | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        self.check("num_virtual_tokens", _count, "a whole number > 0")
        self.check("num_transformer_submodules", lambda v: v in (None, 1, 2), "1 or 2")
        for name in ("task_type", "base_model_name_or_path"):
            self.check(name, _name, "a string")

    def check(self, name: str, valid, want: str) -> None:
        value = getattr(self, name)
        if not valid(value):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise AdapterError(f"adapter_config.json: {name} must be {want}, got {shown}")

    @property
    def submodules(self) -> int:
        return self.num_transformer_submodules or 1

    @classmethod
    def from_json(cls, raw: dict) -> PromptConfig:
        """The fields this method reads; PEFT's other fields are left alone."""
        values = {}
        for f in fields(cls):
            if f.name in raw:
                values[f.name] = raw[f.name]
            elif f.default is MISSING and f.default_factory is MISSING:
                raise AdapterError(f"adapter_config.json has no '{f.name}' for {raw.get('peft_type')}")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class PrefixConfig(PromptConfig):
    """Prefix tuning's model shape, as PEFT records it."""

    num_layers: int
    num_attention_heads: int
    token_dim: int

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_layers", "num_attention_heads", "token_dim"):
            self.check(name, _count, "a whole number > 0")


def float_tensor(name: str, value) -> np.ndarray:
    """`value` as float32, refusing what a cast would silently change or what no prompt can hold:
    complex, integer, boolean or text values, and NaN or Inf (a diverged training run, a damaged file)."""
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise AdapterError(f"{name} holds {array.dtype} values; a soft prompt is a floating-point tensor "
                           "(save it as float32)")
    if not np.isfinite(array).all():
        where = [int(i) for i in np.argwhere(~np.isfinite(array))[0]]
        raise AdapterError(f"{name} holds NaN or Inf (first at {where}); the training diverged or the file is "
                           "damaged: retrain or restore it")
    single = array.astype(np.float32)
    if not np.isfinite(single).all():
        raise AdapterError(f"{name} holds values too large for float32 (up to {float(np.abs(array).max()):.3g}); "
                           "rescale or retrain it")
    return single


def prompt_weights(config: PromptConfig, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The saved `prompt_embeddings` (PEFT stores the prompt encoder's output, not its weights)."""
    if "prompt_embeddings" not in weights:
        raise AdapterError(f"no 'prompt_embeddings' tensor (found {sorted(weights)[:5]})")
    tensor = float_tensor("prompt_embeddings", weights["prompt_embeddings"])
    n_virtual = config.num_virtual_tokens
    if tensor.ndim != 2 or tensor.shape[0] != n_virtual * config.submodules:
        raise AdapterError(f"prompt_embeddings has shape {list(tensor.shape)}, expected "
                           f"[{n_virtual} * {config.submodules}, ...] for num_virtual_tokens={n_virtual}")
    return tensor


def check_fits(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise AdapterError(f"trained for another base model: {what} is {got}, the model has {expected}")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, read with numpy alone (`spexport add` runs without torch)."""
    try:
        return tensorfile.load(path)
    except (ArtifactError, OSError) as e:
        reason = str(e).partition(": ")[2] if isinstance(e, ArtifactError) else str(e)
        raise AdapterError(f"{path}: unreadable ({reason})") from None
