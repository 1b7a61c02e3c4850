"""A decode step's cost without a runtime around it: a graph's steps at batch 1 in the leanest Python loop.

`edge_speed.py` times each engine as users run it. Beside those figures, these cases split an engine's
decode time into its graph and its loop: the same loop over spexport's graph and over onnxruntime-genai's,
with the same session options, compares the graphs alone; the engine's own figure over its graph's bare
loop is what its runtime adds per step (spexport's: sampling, stopping, the mask and positions kept per row,
its I/O binding); genai's graph with past and present bound to one buffer shows what genai's
`past_present_share_buffer` saves (its GroupQueryAttention writes the new slot in place, where a graph
whose attention joins past and new keys into a new present copies the cache every step).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np


def bare_decode(graph: Path, threads: int, past: int, new_tokens: int, shared: bool = False
                ) -> Callable[[], dict]:
    """A case: `new_tokens` decode steps of `graph` after a past of `past` slots (random keys and values) and one
    untimed step (a session that ran just before may still hold the cores a moment), fed token after token
    through one I/O binding, each step's presents bound as the next step's pasts
    without a copy. `shared`: each past and its present bound to one buffer with room for every step
    (only for a graph whose attention writes in place, as genai's does). Returns ms_per_token."""
    import onnxruntime as ort

    from spexport.runtime.session import session_options

    options = session_options()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    inputs = {value.name: value for value in session.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past_key_values.")]
    present_names = [value.name for value in session.get_outputs() if value.name.startswith("present.")]
    vocab = session.get_outputs()[0].shape[-1]
    rng = np.random.default_rng(0)

    def kv(slots: int) -> list[np.ndarray]:
        shapes = [inputs[name].shape for name in past_names]  # [batch, kv heads, slots, head_dim]
        return [np.zeros((1, shape[1], slots, shape[3]), np.float32) for shape in shapes]

    start = [rng.standard_normal(value.shape).astype(np.float32) * 0.1 for value in kv(past)]

    def run() -> dict:
        binding = session.io_binding()
        logits = np.empty((1, 1, vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if shared:
            for name, present, first in zip(past_names, present_names, start):
                bind_shared_cache(binding, name, present, first, past + new_tokens + 1)
        else:
            for name, first in zip(past_names, start):
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(first))
        began = None
        for step in range(new_tokens + 1):  # the first step untimed, as the engines' first token is
            if step == 1:
                began = time.perf_counter()
            total = past + step + 1
            feeds = {"input_ids": np.array([[1000 + step]], np.int64), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.array([[total - 1]], np.int64), "logits_positions": np.zeros((1, 1), np.int64)}
            for name, value in feeds.items():
                if name in inputs:
                    binding.bind_cpu_input(name, value)
            if not shared:
                for name in present_names:
                    binding.bind_output(name, "cpu", 0)
            session.run_with_iobinding(binding)
            if not shared:
                for name, value in zip(past_names, binding.get_outputs()[1:]):
                    binding.bind_ortvalue_input(name, value)
            int(logits[0, 0].argmax())
        return {"ms_per_token": 1000 * (time.perf_counter() - began) / new_tokens}
    return run


def bind_shared_cache(binding, past_name: str, present_name: str, past: np.ndarray, slots: int) -> None:
    """Bind `past` [batch, kv heads, n, head_dim] as the first n slots of a buffer of `slots` that is both the
    graph's `past_name` input and its `present_name` output: a graph that writes in place adds each step's slots
    to it."""
    import onnxruntime as ort

    buffer = np.zeros((*past.shape[:2], slots, past.shape[3]), np.float32)
    buffer[:, :, :past.shape[2]] = past
    value = ort.OrtValue.ortvalue_from_numpy(buffer)
    binding.bind_ortvalue_input(past_name, value)
    binding.bind_ortvalue_output(present_name, value)
