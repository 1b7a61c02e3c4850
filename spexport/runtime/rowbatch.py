"""The engine's running batch: rows of different lengths and tasks stepped together, each row's KV kept
in one batched past whose missing slots are masked.

A row's past is its task prefix, its prompt and its tokens so far. Rows of different lengths are
left-padded with masked slots (the graph lets a row be padded anywhere; positions count real slots), so
every row sees exactly its own tokens. A step feeds each row one token, or several (a prompt-lookup draft);
a row that feeds fewer than the widest gets masked slots after its own, and a rejected draft's slots are
masked out afterwards. The batched past is rebuilt only when the rows change. With an in-place graph, the
batched past is one buffer per layer's key and value, bound as both past and present, which each step writes
its slots into; it grows (doubling) when a step would not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from spexport.artifact.ports import LOGITS_POSITIONS
from spexport.runtime.base import running


class StepGraph(NamedTuple):
    """A decoder's step graph: its session, path, past and present names (per layer: key, value), whether it
    takes logits_positions, the device (name, id) its presents live on, whether it has sliding-window layers, its
    vocabulary, whether its past and present may be one buffer (the in-place graph)."""

    session: ort.InferenceSession
    graph: Path
    past_names: list[str]
    present_names: list[str]
    positional: bool
    device: str
    device_id: int
    windowed: bool
    vocab: int
    inplace: bool


class RowBatch:
    """Rows stepped together. `kvs[i]` is row i's past per past name, [kv_heads, slots, head_dim], all real."""

    def __init__(self, graph: StepGraph, kvs: list[list[np.ndarray]], prefix_feeds: dict[str, np.ndarray]):
        self.graph = graph
        lengths = [kv[0].shape[1] for kv in kvs]
        width = max(lengths)
        self.mask = np.zeros((len(kvs), width), np.int64)
        self.binding = graph.session.io_binding()
        for name, value in prefix_feeds.items():
            self.binding.bind_cpu_input(name, value)
        # on the CPU the presents land in numpy buffers the batch owns: a rebuild reads them without a copy
        self.on_cpu = graph.device == "cpu"
        self.inplace = graph.inplace and self.on_cpu
        # two flat buffers per present, used in turn (a step reads one and writes the other), grown by doubling:
        # fresh memory every step would cost page faults on every write
        self.pools = [[np.empty(0, np.float32), np.empty(0, np.float32)] for _ in graph.present_names]
        self.turn = 0
        self.past: list = []
        capacity = 2 * width if self.inplace else width  # the in-place buffers' room for the steps to come
        for j in range(len(graph.past_names)):
            heads, _, head_dim = kvs[0][j].shape
            past = np.zeros((len(kvs), heads, capacity, head_dim), np.float32)
            for i, kv in enumerate(kvs):
                past[i, :, width - lengths[i]:width] = kv[j]
            self.past.append(past)
        self._bind_past()
        for i, n in enumerate(lengths):
            self.mask[i, width - n:] = 1
        self.fed: list[int] = []  # each row's fed count in the last step
        self.logits: dict[tuple[int, int], np.ndarray] = {}

    @property
    def size(self) -> int:
        return len(self.mask)

    @property
    def wasted(self) -> float:
        """The share of the batched past's slots that are masked."""
        return 1.0 - self.mask.sum() / self.mask.size

    def step(self, fed: list[list[int]]) -> np.ndarray:
        """Feed row i the tokens fed[i] (at least one); the logits after each fed token [rows, widest, vocab]
        (a row's slots past its own count hold anything)."""
        counts = np.array([len(tokens) for tokens in fed])
        width = int(counts.max())
        ids = np.zeros((len(fed), width), np.int64)
        new_mask = np.zeros((len(fed), width), np.int64)
        for i, tokens in enumerate(fed):
            ids[i, :len(tokens)], new_mask[i, :len(tokens)] = tokens, 1
        # positions count real slots, so a row's padding takes none
        position_ids = self.mask.sum(axis=1, keepdims=True) + np.arange(width)
        self.mask = np.concatenate([self.mask, new_mask], axis=1)
        self.fed = counts.tolist()
        keep = np.minimum(np.arange(width), counts[:, None] - 1) if self.graph.positional else None
        return self._run(ids, position_ids, keep)

    def _run(self, ids: np.ndarray, position_ids: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        binding, graph = self.binding, self.graph
        feeds = [("input_ids", ids), ("attention_mask", self.mask), ("position_ids", position_ids)]
        for name, value in feeds + ([(LOGITS_POSITIONS, keep.astype(np.int64))] if keep is not None else []):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        logits = self.logits.get(ids.shape)
        if logits is None:
            logits = self.logits[ids.shape] = np.empty((*ids.shape, graph.vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self.inplace:
            if self.mask.shape[1] > self.past[0].shape[2]:
                self._grow(2 * self.mask.shape[1], self.mask.shape[1] - ids.shape[1])
            with running(graph.graph):
                graph.session.run_with_iobinding(binding)
            return logits
        presents = []
        self.turn ^= 1
        for name, past, pool in zip(graph.present_names, self.past, self.pools):
            if self.on_cpu:
                presents.append(self._buffer(pool, (*past.shape[:2], self.mask.shape[1], past.shape[3])))
                binding.bind_output(name, "cpu", 0, np.float32, list(presents[-1].shape), presents[-1].ctypes.data)
            else:
                binding.bind_output(name, graph.device, graph.device_id)
        with running(graph.graph):
            graph.session.run_with_iobinding(binding)
        self.past = presents if self.on_cpu else binding.get_outputs()[1:]
        self._bind_past()
        return logits

    def _bind_past(self) -> None:
        """Bind `past` as the next step's past (in place: as its present too)."""
        graph = self.graph
        for j, (name, value) in enumerate(zip(graph.past_names, self.past)):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(value, graph.device, graph.device_id)
            self.binding.bind_ortvalue_input(name, value)
            if self.inplace:
                self.binding.bind_ortvalue_output(graph.present_names[j], value)

    def _grow(self, capacity: int, used: int) -> None:
        """Move the in-place buffers' first `used` slots into buffers of `capacity` slots."""
        grown = []
        for past in self.past:
            bigger = np.zeros((*past.shape[:2], capacity, past.shape[3]), np.float32)
            bigger[:, :, :used] = past[:, :, :used]
            grown.append(bigger)
        self.past = grown
        self._bind_past()

    def _buffer(self, pool: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if pool[self.turn].size < size:
            pool[self.turn] = np.empty(max(size, 2 * pool[self.turn].size), np.float32)
        return pool[self.turn][:size].reshape(shape)

    def reject(self, row: int, count: int) -> None:
        """Mask out the last `count` slots row `row` fed in the last step (a draft's rejected tokens)."""
        if count:
            end = self.mask.shape[1] - (max(self.fed) - self.fed[row])
            self.mask[row, end - count:end] = 0

    def take(self) -> list[list[np.ndarray]]:
        """Each row's past, its real slots only, per past name [kv_heads, slots, head_dim]."""
        width = self.mask.shape[1]  # an in-place buffer has room beyond the slots in use
        values = [(value.numpy() if isinstance(value, ort.OrtValue) else value)[:, :, :width] for value in self.past]
        kvs = []
        for row in self.mask.astype(bool):
            slots = np.flatnonzero(row)
            if len(slots) and slots[-1] - slots[0] + 1 == len(slots):  # one run of real slots: a view, no copy
                kvs.append([value[len(kvs), :, slots[0]:slots[-1] + 1] for value in values])
            else:
                kvs.append([value[len(kvs)][:, row] for value in values])
        return kvs
