"""Turn a soft-prompt checkpoint into canonical tensors, one module per method.

Every method module registers its PEFT `peft_type`, its typed config (checked on construction) and
its converter (registry.py). A converter takes the config, the adapter's weights and the frozen
model's shape, and returns a `SoftPrompt`: either virtual-token input embeddings or a per-layer KV
prefix (or, for methods that hold several tasks, a dict of them by suffix). Adding a method is one
module that ends with `register_method(...)`, imported here.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters import (  # noqa: F401  (each registers its method)
    multitask_prompt_tuning,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    raw_tensor,
    seq2seq_prefix_tuning,
)
from spexport.converters.base import SoftPrompt, read_safetensors
from spexport.converters.registry import METHODS, Method, methods_for
from spexport.errors import AdapterError
from spexport.families import Family

__all__ = ["METHODS", "TASK_NAME", "Method", "SoftPrompt", "check_task_names", "convert_adapter", "exists",
           "methods_for", "parse_adapters", "read_peft_adapter"]

# One rule for task names that every file named after a task can take: ONNX Runtime's adapter files
# (adapters/NAME.onnx_adapter, '/' written %2F: at most 1 + 63 * 3 + 13 = 203 bytes, under every file
# system's 255) and encoder heads alike, on case-insensitive file systems too.
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,63}$")
TASK_NAME_RULE = "at most 64 characters of letters, digits, '_', '-', '.' and '/', starting with a letter or digit"


def parse_adapters(specs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The `--adapter NAME=PATH` pairs, each name allowed and each path there (a name given twice is refused
    with the tasks, by converters.bank.adapter_prompts)."""
    for name, path in specs:
        check_task_names([name])
        if not exists(Path(path)):
            raise AdapterError(f"adapter {name}: {path} does not exist")
    if not specs:
        raise AdapterError("no adapters given; pass at least one --adapter NAME=PATH")
    return list(specs)


def check_task_names(names: list[str]) -> None:
    """Refuse a task name that some file of the artifact could not be named after, or two names that
    would be one file on a case-insensitive file system (macOS, Windows)."""
    folded: dict[str, str] = {}
    for name in names:
        if not TASK_NAME.match(name):
            raise AdapterError(f"task name {name!r} is not allowed: a task name is {TASK_NAME_RULE}")
        other = folded.setdefault(name.lower(), name)
        if other != name:
            raise AdapterError(f"task names {other!r} and {name!r} differ only in case, so their files would be one "
                               "on macOS and Windows; rename one")


def exists(path: Path) -> bool:
    """Whether `path` exists; a name the file system cannot hold (too long, say) names nothing."""
    try:
        return path.exists()
    except OSError:
        return False


def read_peft_adapter(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read adapter_config.json and the weights of a PEFT adapter folder, never running its code."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past Python's stack
        raise AdapterError(f"{config_path}: unreadable adapter config ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: not a PEFT adapter config (not a JSON object)")
    if (folder / "adapter_model.safetensors").is_file():
        weights = read_safetensors(folder / "adapter_model.safetensors")
    elif (folder / "adapter_model.bin").is_file():
        weights = _load_pickle_weights(folder / "adapter_model.bin")
    else:
        raise AdapterError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    return config, weights


def _load_pickle_weights(path: Path) -> dict[str, np.ndarray]:
    import pickle
    import re

    try:
        import torch
    except ImportError:
        raise AdapterError(f"{path}: a pickle checkpoint, which only torch reads safely, and torch is not installed; "
                           "save the adapter as adapter_model.safetensors (or pip install torch)") from None

    try:
        # weights_only refuses any pickle that would build objects other than tensors: no code runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        called = re.search(r"GLOBAL (\S+)", str(e))
        why = f"loading it would call {called.group(1)}" if called else "not a plain tensor checkpoint"
        raise AdapterError(f"{path}: refused, {why}; save the adapter as adapter_model.safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: refused, expected a dict of tensors")
    # floats as float32 (numpy has no bfloat16); anything else keeps its type, for the converters to refuse
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy() for k, v in state.items()}


def convert_adapter(name: str, path: Path, model: ModelInfo, family: Family) -> dict[str, SoftPrompt]:
    """Tasks (by name) that one --adapter NAME=PATH yields for a `family` artifact: one, or NAME/i for
    multitask adapters. Everything is checked here, before any model loads: the config's fields and
    every tensor's type, shape and values (NaN or Inf are refused, nothing is cast)."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix in raw_tensor.SUFFIXES:
            prompts = {name: raw_tensor.convert(path, model)}
            source = {"file": path.name, "format": path.suffix[1:]}
        else:
            config, weights = read_peft_adapter(path)
            prompts = _convert_peft(path, config, weights, model, family)
            prompts = {f"{name}/{suffix}": p for suffix, p in prompts.items()} if isinstance(prompts, dict) \
                else {name: prompts}
            source = {"file": path.resolve().name, "format": "peft", "peft_version": config.get("peft_version"),
                      "base_model": base_model_name(config)}
        for prompt in prompts.values():
            prompt.source = source
            if not np.isfinite(prompt.tensor).all():  # finite factors whose product is not (multitask)
                raise AdapterError(f"{path}: its prompt holds NaN or Inf once composed; the training diverged")
            if prompt.num_virtual_tokens >= model.max_positions:
                raise AdapterError(f"{path}: {prompt.num_virtual_tokens} virtual tokens leave no room for input "
                                   f"in the model's {model.max_positions} positions")
    except AdapterError as e:
        raise AdapterError(f"adapter {name}: {e}") from None
    return prompts


def base_model_name(config: dict) -> str | None:
    """The base model an adapter names, by name only: an artifact travels, and the exporting machine's
    paths are none of its business."""
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return None
    return Path(base).name if Path(base).is_absolute() else base


def _convert_peft(folder: Path, raw: dict, weights: dict, model: ModelInfo, family: Family):
    methods = methods_for(family)
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in methods:
        raise AdapterError(f"{folder}: adapter method {peft_type} is not supported; "
                           f"spexport converts {', '.join(sorted(methods))}")
    method = methods[peft_type]
    try:
        config = method.config_cls.from_json(raw)
        if config.task_type is not None and config.task_type not in family.task_types:
            raise AdapterError(f"trained with task_type {config.task_type}; a {family.name} artifact takes adapters "
                               f"trained with task_type {' or '.join(family.task_types)}")
        return method.convert(config, weights, model)
    except AdapterError as e:
        raise AdapterError(f"{folder}: {e}") from None
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{folder}: adapter_config.json does not fit its weights ({e})") from None
