"""Classifier heads of SEQ_CLS and TOKEN_CLS adapters.

PEFT trains a classifier's head along with the soft prompt (`modules_to_save`: every module whose
name ends in `classifier` or `score`, so DistilBERT's `pre_classifier` too) and saves it in the
adapter under `base_model.<module path>`. Each task keeps its own head and label set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spexport.converters.base import float_tensor
from spexport.errors import AdapterError

KINDS = {"SEQ_CLS": "sequence", "TOKEN_CLS": "token"}  # PEFT task_type -> what the head classifies
SAVED_UNDER = "base_model."


@dataclass
class Head:
    """A task's trained head: `weights` by parameter name in the task's transformers model."""

    kind: str  # "sequence" (one label per text) or "token" (one label per token)
    weights: dict[str, np.ndarray]
    labels: list[str] | None  # id2label from a config.json beside the adapter, if there is one


def read_head(folder: Path, config: dict, weights: dict[str, np.ndarray]) -> Head:
    """The head that a PEFT adapter (its config and weights, as `read_peft_adapter` gives them) saved."""
    task_type = config.get("task_type")
    if task_type not in KINDS:
        raise AdapterError(f"{folder}: task_type {task_type!r} has no classifier; an encoder artifact serves "
                           f"adapters trained with task_type {' or '.join(KINDS)}")
    try:
        head = {name[len(SAVED_UNDER):]: float_tensor(name, tensor) for name, tensor in weights.items()
                if name.startswith(SAVED_UNDER)}
    except AdapterError as e:
        raise AdapterError(f"{folder}: {e}") from None
    return Head(KINDS[task_type], head, _labels(folder))


def _labels(folder: Path) -> list[str] | None:
    """id2label of a transformers config.json saved beside the adapter (`model.config.save_pretrained`)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        id2label = json.loads(path.read_text()).get("id2label")
        return [str(id2label[str(i)]) for i in range(len(id2label))] if id2label else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError) as e:
        raise AdapterError(f"{path}: id2label is unreadable ({e}); it must map 0, 1, ... to label names") from None
