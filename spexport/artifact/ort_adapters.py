"""Each task's KV prefix as an ONNX Runtime adapter file, for clients that pick a task by adapter.

An unbaked graph takes `kv_prefix` [batch, layers, 2, kv_heads, P, head_dim] and `prefix_mask`
[batch, P] as inputs. An ONNX Runtime adapter file (`.onnx_adapter`, written by
`onnxruntime.AdapterFormat`) holds named tensors; a run with the adapter active
(C: `RunOptionsAddActiveLoraAdapter`, C++: `Ort::RunOptions::AddActiveLoraAdapter`, C#:
`RunOptions.AddActiveLoraAdapter`) feeds them as inputs of those names. So one file per task,
holding that task's prefix as a batch of one row, selects the task with no prompt-bank parsing.

Limits, all from ONNX Runtime itself: an adapter feeds a whole input, so a run picks one task
for the whole batch, and the batch has one row; IO binding (`RunWithBinding`) ignores active
adapters; the Python `InferenceSession.run` refuses a feed without `kv_prefix` before the core
sees it; onnxruntime-node has no adapter API (onnxruntime-web has one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from spexport.artifact.ports import KV_PREFIX, PREFIX_MASK

FOLDER = "adapters"
SUFFIX = ".onnx_adapter"


def adapter_path(task: str) -> str:
    """The adapter file of `task`, relative to the artifact folder.

    Task names may hold '/', which would make folders; it becomes '%2F'. Task names never hold
    '%', so the mapping cannot make two tasks share a file.
    """
    return f"{FOLDER}/{task.replace('/', '%2F')}{SUFFIX}"


def adapter_parameters(kv: np.ndarray) -> dict[str, np.ndarray]:
    """The graph inputs that select one task: its prefix [layers, 2, kv_heads, n, head_dim] as one row."""
    kv = np.ascontiguousarray(kv[None], np.float32)
    return {KV_PREFIX: kv, PREFIX_MASK: np.ones((1, kv.shape[4]), np.int64)}


def write_adapters(bank: dict[str, np.ndarray], folder: Path) -> list[str]:
    """Write one adapter file per task of `bank` (task name -> KV prefix) under `folder`.

    Returns the files' paths relative to `folder`.
    """
    written = []
    for task, kv in bank.items():
        rel = adapter_path(task)
        (Path(folder) / rel).parent.mkdir(parents=True, exist_ok=True)
        arrays = adapter_parameters(kv)  # OrtValues borrow these buffers on the CPU: keep them alive
        adapter = ort.AdapterFormat()
        adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()})
        try:
            adapter.export_adapter(str(Path(folder) / rel))
        except RuntimeError as e:  # ONNX Runtime's writer reports a full disk or a refused path this way
            raise OSError(f"ONNX Runtime could not write {rel} ({str(e).strip().splitlines()[-1][-200:]})") from None
        written.append(rel)
    return written
