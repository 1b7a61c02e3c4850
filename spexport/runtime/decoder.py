"""Serving a decoder-only artifact: logits and generation for many tasks in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from spexport.artifact.integrity import inside_folder
from spexport.artifact.manifest import Manifest
from spexport.artifact.ports import (
    KV_PREFIX,
    PAST_KEY,
    PAST_VALUE,
    PREFIX_MASK,
    PRESENT_KEY,
    PRESENT_VALUE,
    TASK_IDS,
    stack_prefixes,
)
from spexport.runtime import inputs
from spexport.runtime.base import running
from spexport.runtime.generation import GeneratingModel
from spexport.runtime.session import check_ports, load_bank, load_tokenizer, open_session


class DecoderModel(GeneratingModel):
    """A frozen causal LM plus a bank of per-task KV prefixes."""

    FAMILY = "decoder-only"

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str],
                 max_batch_size: int = inputs.MAX_BATCH_SIZE):
        super().__init__(folder, manifest, max_batch_size)
        # a baked graph holds the prompt bank itself and picks each row's prefix by task id
        self._prefixes = None
        if not manifest.baked:
            bank = load_bank(folder, manifest)
            self._prefixes = [bank[t.tensor] for t in manifest.tasks]
        layers = range(self.info.num_layers)
        self._past_names = [n.format(i) for i in layers for n in (PAST_KEY, PAST_VALUE)]
        self._present_names = [n.format(i) for i in layers for n in (PRESENT_KEY, PRESENT_VALUE)]
        self._graph = inside_folder(folder, manifest.graph)
        self.session = open_session(self._graph, providers)
        check_ports(self.session, self._graph, *self._ports())
        self.providers = self.session.get_providers()
        self.tokenizer = load_tokenizer(folder, manifest)

    def _ports(self) -> tuple[dict[str, list], dict[str, list]]:
        """The graph's inputs and outputs as the manifest describes them (None: any size)."""
        info = self.info
        kv = [None, info.num_kv_heads, None, info.head_dim]
        prefix = {TASK_IDS: [None]} if self._prefixes is None else {
            KV_PREFIX: [None, info.num_layers, 2, info.num_kv_heads, None, info.head_dim], PREFIX_MASK: [None, None]}
        tokens = dict.fromkeys(["input_ids", "attention_mask", "position_ids"], [None, None])
        return ({**tokens, **prefix, **dict.fromkeys(self._past_names, kv)},
                {"logits": [None, None, info.vocab_size], **dict.fromkeys(self._present_names, kv)})

    # -- batching -------------------------------------------------------------------------------

    def _prefix(self, rows: list[int]) -> dict[str, np.ndarray]:
        """The graph inputs that select each row's prompt."""
        if self._prefixes is None:
            return {TASK_IDS: np.array(rows, np.int64)}
        kv, mask = stack_prefixes([self._prefixes[r] for r in rows])
        return {KV_PREFIX: kv, PREFIX_MASK: mask}

    def _first_step(self, mask: np.ndarray, rows: list[int]):
        """Generation's first feeds: (prefix inputs, past, attention mask, position ids).

        With a prompt bank, each row's prefix goes in as the past, with its mask ahead of the
        caller's and positions after it, while the graph's own prefix inputs stay empty: what the
        graph would join inside it, the caller joins once. `present` then holds prefix and tokens
        and is passed back as it is, so no later step splits, concatenates or slices off the prefix.
        A baked graph holds its prompts, so it is given task ids and an empty past.
        """
        if self._prefixes is None:
            return self._prefix(rows), self._empty_past(len(rows)), mask, inputs.positions(mask)
        info = self.info
        kv, prefix_mask = stack_prefixes([self._prefixes[r] for r in rows])
        empty = {KV_PREFIX: np.zeros((len(rows), info.num_layers, 2, info.num_kv_heads, 0, info.head_dim),
                                     np.float32), PREFIX_MASK: np.zeros((len(rows), 0), np.int64)}
        past = [np.ascontiguousarray(kv[:, layer, which]) for layer in range(info.num_layers) for which in (0, 1)]
        positions = inputs.positions(mask) + prefix_mask.sum(axis=1, keepdims=True)
        return empty, past, np.concatenate([prefix_mask, mask], axis=1), positions

    def _steps(self, ids: np.ndarray, mask: np.ndarray, rows: list[int]) -> _BoundSteps:
        return _BoundSteps(self, ids, *self._first_step(mask, rows))

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.info.num_kv_heads, 0, self.info.head_dim)
        return [np.zeros(shape, np.float32) for _ in self._past_names]

    def _room(self, ids: np.ndarray, rows: list[int]) -> int:
        return self.info.max_positions - max(self._positions_taken[r] for r in rows) - ids.shape[1]

    def _sequence_start(self, ids: np.ndarray) -> np.ndarray:
        return ids

    # -- public verbs (generate and generate_text: GeneratingModel) ------------------------------

    def logits(self, input_ids, attention_mask=None, task: str | Sequence[str] = None) -> np.ndarray:
        """Logits [batch, seq, vocab] for the caller's tokens (no virtual positions)."""
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": inputs.positions(mask),
                 **self._prefix(rows), **dict(zip(self._past_names, self._empty_past(len(ids))))}
        return self._run(self.session, self._graph, ["logits"], feeds)[0]


class _BoundSteps:
    """One generation's steps, bound to the session with IO binding.

    The prefix inputs and the first past are bound once. Each step's `present.*` outputs stay ONNX
    Runtime values and are bound as the next step's `past_key_values.*` (on a GPU provider they
    never leave the device). Logits land in numpy buffers allocated once per shape, so no step
    copies them.
    """

    DEVICES = {"CUDAExecutionProvider": "cuda"}  # where present.* live; anything else: the CPU

    def __init__(self, model: DecoderModel, ids: np.ndarray, prefix: dict[str, np.ndarray], past: list[np.ndarray],
                 mask: np.ndarray, position_ids: np.ndarray):
        self.session, self.graph = model.session, model._graph
        self.binding = model.session.io_binding()
        self.device = self.DEVICES.get(model.providers[0], "cpu")
        self.past_names, self.present_names = model._past_names, model._present_names
        self.vocab = model.info.vocab_size
        self.logits: dict[tuple[int, int], np.ndarray] = {}
        for name, value in [*prefix.items(), *zip(self.past_names, past)]:
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        self.ids, self.mask, self.position_ids = ids, mask, position_ids

    def first(self) -> np.ndarray:
        return self.run(self.ids, self.mask, self.position_ids)

    def next(self, tokens: np.ndarray) -> np.ndarray:
        position_ids = self.mask.sum(axis=1, keepdims=True)
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        return self.run(tokens[:, None], self.mask, position_ids)

    def run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run one step; the logits of each row's last position [batch, vocab]."""
        binding = self.binding
        for name, value in [("input_ids", ids), ("attention_mask", mask), ("position_ids", position_ids)]:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        logits = self.logits.get(ids.shape)
        if logits is None:
            logits = self.logits[ids.shape] = np.empty((*ids.shape, self.vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        with running(self.graph):
            self.session.run_with_iobinding(binding)
        for name, value in zip(self.past_names, binding.get_outputs()[1:]):
            binding.bind_ortvalue_input(name, value)
        return logits[:, -1]
