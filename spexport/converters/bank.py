"""From adapters to the prompt bank: the one path that `spexport convert`, `spexport add` and a live
`add_task` share. `adapter_prompts` converts and checks every adapter's tasks (a task name given twice is
refused here and nowhere else); `bank_entry` turns one converted prompt into its manifest `Task` and its bank
tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from spexport.artifact.manifest import ModelInfo, Task
from spexport.converters import check_task_names, convert_adapter
from spexport.converters.base import SoftPrompt
from spexport.errors import AdapterError
from spexport.families import Family


def adapter_prompts(adapters: list[tuple[str, Path]], info: ModelInfo,
                    family: Family) -> list[tuple[str, dict[str, SoftPrompt]]]:
    """Each adapter's name and the tasks it yields (a multitask adapter NAME: NAME/0, NAME/1, ...), every one
    converted and checked, task names too, before anything runs a model."""
    found, names = [], []
    for name, path in adapters:
        tasks = convert_adapter(name, path, info, family)
        for task in tasks:
            if task in names:
                raise AdapterError(f"task name {task!r} is given twice; every task needs its own name")
            names.append(task)
        check_task_names(names)
        found.append((name, tasks))
    return found


def bank_entry(name: str, prompt: SoftPrompt, kv_of: Callable[[np.ndarray], np.ndarray] | None = None,
               head: dict | None = None) -> tuple[Task, np.ndarray]:
    """Task `name`'s manifest entry and its bank tensor (float32, contiguous).

    kv_of: what turns virtual-token embeddings [n, hidden] into their KV prefix [layers, 2, kv_heads, n,
    head_dim] (the frozen model in torch at export, the artifact's prefix graph when a task is added); without
    it the prompt is stored as it is (a bank that holds embeddings). A prefix computed as NaN or Inf is refused.
    """
    tensor = prompt.tensor
    if kv_of is not None and prompt.kind == "embeddings":
        tensor = kv_of(prompt.tensor)
        if not np.isfinite(tensor).all():
            raise AdapterError(f"task {name!r}: the KV prefix that the frozen model computes from its prompt holds "
                               "NaN or Inf; the model's weights hold NaN or Inf, or the prompt's values are too large "
                               "for it")
    tensor = np.ascontiguousarray(tensor, np.float32)
    task = Task(name=name, method=prompt.method, num_virtual_tokens=prompt.num_virtual_tokens, tensor=name,
                shape=list(tensor.shape), dtype="float32", source={**prompt.source, "kind": prompt.kind}, head=head)
    return task, tensor
