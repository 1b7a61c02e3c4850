"""Serving a decoder-only artifact: logits and generation for many tasks in one batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from spexport.artifact.integrity import inside_folder
from spexport.artifact.manifest import Manifest
from spexport.artifact.ports import (
    KV_PREFIX,
    LOGITS_POSITIONS,
    PAST_KEY,
    PAST_VALUE,
    PREFIX_MASK,
    PRESENT_KEY,
    PRESENT_VALUE,
    TASK_IDS,
    stack_prefixes,
)
from spexport.errors import AdapterError, InputError
from spexport.families import DECODER
from spexport.runtime import inputs
from spexport.runtime.base import Batch, TaskTable, finite_logits, running
from spexport.runtime.device import io_device, runs_inplace_cache
from spexport.runtime.engine import Engine
from spexport.runtime.generation import GeneratingModel, GenerationConfig
from spexport.runtime.prefix import check_editable, new_tasks
from spexport.runtime.rowbatch import StepGraph
from spexport.runtime.session import check_ports, load_bank, open_session


class DecoderModel(GeneratingModel):
    """A frozen causal LM plus a bank of per-task KV prefixes."""

    family = DECODER

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str],
                 max_batch_size: int = inputs.MAX_BATCH_SIZE, options: ort.SessionOptions | None = None):
        super().__init__(folder, manifest, max_batch_size)
        # a baked graph holds the prompt bank itself and picks each row's prefix by task id
        if not manifest.baked:
            bank = load_bank(folder, manifest)
            self._table = replace(self._table, prompts=tuple(bank[t.tensor] for t in manifest.tasks))
        self._tasks_lock = threading.Lock()
        self._providers = providers
        layers = range(self.info.num_layers)
        self._past_names = [n.format(i) for i in layers for n in (PAST_KEY, PAST_VALUE)]
        self._present_names = [n.format(i) for i in layers for n in (PRESENT_KEY, PRESENT_VALUE)]
        # an unbaked artifact's prefix is joined here, once, as the first step's past: the core graph, which
        # has no prefix inputs, saves every step the main graph's copies of an empty prefix
        self._core = not manifest.baked and manifest.core_graph is not None
        # the core graph with GroupQueryAttention, where it runs: a generation's cache is then one buffer per
        # layer, bound as past and present, that each step writes its slots into (no copy of the cache a step)
        self._inplace = self._core and manifest.inplace_graph is not None and runs_inplace_cache(providers)
        graph = manifest.inplace_graph if self._inplace else manifest.core_graph if self._core else manifest.graph
        self._graph = inside_folder(folder, graph)
        self.session = open_session(self._graph, providers, options)
        # the core graph computes logits only where asked (generation: each row's last real token)
        self._positional = LOGITS_POSITIONS in {value.name for value in self.session.get_inputs()}
        check_ports(self.session, self._graph, *self._ports())
        self.providers = self.session.get_providers()

    def _ports(self) -> tuple[dict[str, list], dict[str, list]]:
        """The graph's inputs and outputs as the manifest describes them (None: any size)."""
        info = self.info
        kv = [None, info.num_kv_heads, None, info.head_dim]
        prefix = {TASK_IDS: [None]} if self.manifest.baked else {} if self._core else {
            KV_PREFIX: [None, info.num_layers, 2, info.num_kv_heads, None, info.head_dim], PREFIX_MASK: [None, None]}
        tokens = dict.fromkeys(["input_ids", "attention_mask", "position_ids",
                                *([LOGITS_POSITIONS] if self._positional else [])], [None, None])
        return ({**tokens, **prefix, **dict.fromkeys(self._past_names, kv)},
                {"logits": [None, None, info.vocab_size], **dict.fromkeys(self._present_names, kv)})

    # -- batching -------------------------------------------------------------------------------

    def _first_step(self, mask: np.ndarray, rows: list[int], table: TaskTable
                    ) -> tuple[dict[str, np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
        """Generation's first feeds for rows of task ids `rows` in `table`: (prefix inputs, past, attention
        mask, position ids).

        With a prompt bank, each row's prefix goes in as the past, with its mask ahead of the
        caller's and positions after it: what the main graph would join inside it, the caller joins
        once. The core graph has no prefix inputs (the main graph's stay empty). `present` then holds
        prefix and tokens and is passed back as it is, so no later step splits off the prefix.
        A baked graph holds its prompts, so it is given task ids and an empty past.
        """
        prompts = table.prompts
        if prompts is None:
            return {TASK_IDS: np.array(rows, np.int64)}, self._empty_past(len(rows)), mask, inputs.positions(mask)
        info = self.info
        kv, prefix_mask = stack_prefixes([prompts[r] for r in rows])
        empty = {} if self._core else {
            KV_PREFIX: np.zeros((len(rows), info.num_layers, 2, info.num_kv_heads, 0, info.head_dim), np.float32),
            PREFIX_MASK: np.zeros((len(rows), 0), np.int64)}
        past = [np.ascontiguousarray(kv[:, layer, which]) for layer in range(info.num_layers) for which in (0, 1)]
        positions = inputs.positions(mask) + prefix_mask.sum(axis=1, keepdims=True)
        return empty, past, np.concatenate([prefix_mask, mask], axis=1), positions

    def _steps(self, batch: Batch, new_tokens: int) -> _BoundSteps | _GroupedSteps:
        groups = self._window_groups(batch.mask)
        if groups is not None:
            return _GroupedSteps(self._graph, [(group, self._steps(self._unpadded(batch, group), new_tokens))
                                               for group in groups])
        return _BoundSteps(self, batch.ids, inputs.last_real(batch.mask),
                           *self._first_step(batch.mask, batch.rows, batch.table), new_tokens=new_tokens)

    def _window_groups(self, mask: np.ndarray) -> list[np.ndarray] | None:
        """The batch's rows grouped by their number of real tokens, where the model has sliding-window
        layers and a row has padding; else None.

        A window counts slots, padding among them, so a padded row would see fewer of its own tokens in
        it than alone. Each group runs without padding, every row as it would alone.
        """
        if self.info.sliding_window is None or mask.all():
            return None
        lengths = mask.sum(axis=1)
        return [np.flatnonzero(lengths == n) for n in np.unique(lengths)]

    def _unpadded(self, batch: Batch, group: np.ndarray) -> Batch:
        """The rows of `group`, which have equal numbers of real tokens, with their padding taken out (as
        runs of the model: an ensemble's owners stay with the whole batch)."""
        real = batch.ids[group][batch.mask[group] == 1].reshape(len(group), -1)
        return Batch(real, np.ones_like(real), [batch.rows[i] for i in group], batch.table)

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.info.num_kv_heads, 0, self.info.head_dim)
        return [np.zeros(shape, np.float32) for _ in self._past_names]

    def _room(self, batch: Batch) -> int:
        positions = batch.table.positions
        return self.info.max_positions - max(positions[r] for r in batch.rows) - batch.ids.shape[1]

    def _sequence_start(self, ids: np.ndarray) -> np.ndarray:
        return ids

    # -- what the engine (runtime/engine.py) runs a row with ------------------------------------

    def step_graph(self) -> StepGraph:
        """The graph generation steps run, and its port names, for callers that hold their own KV (the engine)."""
        return StepGraph(self.session, self._graph, self._past_names, self._present_names, self._positional,
                         *io_device(self.session), self.info.sliding_window is not None,
                         self.info.vocab_size, self._inplace)

    def task_table(self) -> TaskTable:
        """The task list requests are checked against now (replaced whole by add_task / remove_task)."""
        return self._table

    def _token_columns(self, batch: Batch, config: GenerationConfig,
                       stopped: np.ndarray | None = None) -> Iterator[np.ndarray]:
        if not config.prompt_lookup_num_tokens or batch.owners is not None:
            # an ensemble's members share one continuation: they decode one token a step, without drafts
            return super()._token_columns(batch, config, stopped)
        return lookup_columns(self, batch, config, self._room(batch), self.info.padding_token, stopped)

    def row_start(self, task_id: int, table: TaskTable) -> tuple[list[np.ndarray], int]:
        """A row's past before its first token, per past name [kv_heads, slots, head_dim], and its number of
        slots: its task's prefix (what `_first_step` joins for it), or nothing for a baked graph."""
        if table.prompts is None:
            return [past[0] for past in self._empty_past(1)], 0
        kv = table.prompts[task_id]
        return [kv[layer, which] for layer in range(self.info.num_layers) for which in (0, 1)], kv.shape[3]

    def batch_feeds(self, task_ids: list[int]) -> dict[str, np.ndarray]:
        """The prefix inputs of a step over rows of `task_ids` whose prefixes are already in their past."""
        if self.manifest.baked:
            return {TASK_IDS: np.array(task_ids, np.int64)}
        if self._core:
            return {}
        info, batch = self.info, len(task_ids)
        return {KV_PREFIX: np.zeros((batch, info.num_layers, 2, info.num_kv_heads, 0, info.head_dim), np.float32),
                PREFIX_MASK: np.zeros((batch, 0), np.int64)}

    # -- tasks on a running model ----------------------------------------------------------------

    def add_task(self, name: str, path: str | Path, replace: bool = False) -> list[str]:
        """Serve the adapter (or tensor file) at `path` as task `name` from now on, as `spexport add` would
        (a multitask adapter adds NAME/0, NAME/1, ...); returns the names added. The artifact on disk is
        not changed. Requests already running keep the task list they started with.
        """
        added = new_tasks(self.folder, self.manifest, [(name, Path(path))], self._providers)
        with self._tasks_lock:
            table = self._table
            names, prompts, virtual = list(table.names), list(table.prompts), list(table.virtual)
            for task, kv in added:
                if task.name in self._ensembles:
                    raise AdapterError(f"the model serves an ensemble named {task.name!r}; pick another name")
                if task.name in names and not replace:
                    raise AdapterError(f"the model already serves a task {task.name!r}; pass replace=True to "
                                       "replace it, or pick another name")
                if task.name in names:
                    at = names.index(task.name)
                    prompts[at], virtual[at] = kv, task.num_virtual_tokens
                else:
                    names.append(task.name)
                    prompts.append(kv)
                    virtual.append(task.num_virtual_tokens)
            self._table = TaskTable(tuple(names), tuple(virtual), tuple(virtual), tuple(prompts))
        return [task.name for task, _ in added]

    def remove_task(self, name: str) -> None:
        """Stop serving task `name`; later tasks' ids move down by one. Running requests are not affected."""
        check_editable(self.folder, self.manifest)  # a baked graph's task ids index its own constants
        with self._tasks_lock:
            table = self._table
            if name not in table.names:
                raise InputError(f"no task {name!r}; this model serves {', '.join(table.names)}")
            self._refuse_removing_member(name)
            if len(table.names) == 1:
                raise InputError(f"{name!r} is the model's only task; a model keeps at least one")
            keep = [i for i, n in enumerate(table.names) if n != name]
            self._table = TaskTable(*(tuple(column[i] for i in keep) for column in
                                      (table.names, table.virtual, table.positions, table.prompts)))

    # -- public verbs (generate and generate_text: GeneratingModel) ------------------------------

    def logits(self, input_ids, attention_mask=None, task: str | Sequence[str] = None) -> np.ndarray:
        """Logits [batch, seq, vocab] for the caller's tokens (no virtual positions)."""
        batch = self._prepare(input_ids, attention_mask, task, verb="logits")
        groups = self._window_groups(batch.mask)
        if groups is None:
            return self._logits(batch)
        out = np.zeros((*batch.ids.shape, self.info.vocab_size), np.float32)  # padding slots: 0
        for group in groups:
            slots = np.nonzero(batch.mask[group])[1].reshape(len(group), -1)
            out[group[:, None], slots] = self._logits(self._unpadded(batch, group))
        return out

    def _logits(self, batch: Batch) -> np.ndarray:
        ids, mask = batch.ids, batch.mask
        prefix, past, joined, positions = self._first_step(mask, batch.rows, batch.table)
        feeds = {"input_ids": ids, "attention_mask": joined, "position_ids": positions, **prefix,
                 **dict(zip(self._past_names, past))}
        if self._positional:
            feeds[LOGITS_POSITIONS] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        return finite_logits(self._run(self.session, self._graph, ["logits"], feeds)[0], self._graph, mask)


class _GroupedSteps:
    """A batch's steps run group by group (each group's rows, `Steps` of their own), logits in batch order."""

    def __init__(self, graph: Path, parts: list[tuple[np.ndarray, _BoundSteps]]):
        self.graph, self.parts = graph, parts
        self.batch = sum(len(group) for group, _ in parts)

    def first(self) -> np.ndarray:
        return self._gather(lambda steps, group: steps.first())

    def next(self, tokens: np.ndarray) -> np.ndarray:
        return self._gather(lambda steps, group: steps.next(tokens[group]))

    def _gather(self, run) -> np.ndarray:
        out = None
        for group, steps in self.parts:
            logits = run(steps, group)
            if out is None:
                out = np.empty((self.batch, logits.shape[-1]), logits.dtype)
            out[group] = logits
        return out


class _BoundSteps:
    """One generation's steps, bound to the session with IO binding.

    The prefix inputs and the first past are bound once. Each step's `present.*` outputs stay ONNX
    Runtime values and are bound as the next step's `past_key_values.*` (on a GPU provider they
    never leave the device). With the in-place graph, each layer's key and value are instead one buffer
    each, as long as the whole generation, bound once as both past and present: a step writes its slots
    into them (after the mask's slots so far) and copies nothing else. Logits land in numpy buffers
    allocated once per shape, so no step copies them.
    """

    def __init__(self, model: DecoderModel, ids: np.ndarray, last: np.ndarray, prefix: dict[str, np.ndarray],
                 past: list[np.ndarray], mask: np.ndarray, position_ids: np.ndarray, new_tokens: int):
        self.session, self.graph = model.session, model._graph
        self.binding = model.session.io_binding()
        self.device, self.device_id = io_device(model.session)  # where present.* live
        self.past_names, self.present_names = model._past_names, model._present_names
        self.vocab, self.positional, self.inplace = model.info.vocab_size, model._positional, model._inplace
        self.logits: dict[tuple[int, int], np.ndarray] = {}
        for name, value in prefix.items():
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, self.device_id))
        # the last new token is never fed: the mask grows to its width plus new_tokens - 1 slots
        capacity = mask.shape[1] + max(new_tokens - 1, 0)
        for past_name, present_name, value in zip(self.past_names, self.present_names, past):
            if self.inplace:
                cache = np.zeros((*value.shape[:2], capacity, value.shape[3]), np.float32)
                cache[:, :, :value.shape[2]] = value
                bound = ort.OrtValue.ortvalue_from_numpy(cache)
                self.binding.bind_ortvalue_output(present_name, bound)
            else:
                bound = ort.OrtValue.ortvalue_from_numpy(value, self.device, self.device_id)
            self.binding.bind_ortvalue_input(past_name, bound)
        self.ids, self.last, self.mask, self.position_ids = ids, last, mask, position_ids

    def first(self) -> np.ndarray:
        if self.positional:  # the graph computes the last real token's logits alone
            return self.run(self.ids, self.mask, self.position_ids, np.asarray(self.last, np.int64)[:, None])[:, 0]
        return self.run(self.ids, self.mask, self.position_ids)[np.arange(len(self.ids)), self.last]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        # positions count real tokens, so a row's padding (right or in gaps) takes none
        position_ids = self.mask.sum(axis=1, keepdims=True)
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        keep = np.zeros((len(tokens), 1), np.int64) if self.positional else None
        return self.run(tokens[:, None], self.mask, position_ids, keep)[:, -1]

    def run(self, ids: np.ndarray, mask: np.ndarray, position_ids: np.ndarray,
            keep: np.ndarray | None = None) -> np.ndarray:
        """Run one step; its logits [batch, seq or len(keep), vocab], in a buffer that the next step of this
        shape reuses. `keep`: the positions whose logits the core graph computes."""
        binding = self.binding
        feeds = [("input_ids", ids), ("attention_mask", mask), ("position_ids", position_ids)]
        for name, value in feeds + ([(LOGITS_POSITIONS, keep)] if keep is not None else []):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        shape = ids.shape if keep is None else keep.shape
        logits = self.logits.get(shape)
        if logits is None:
            logits = self.logits[shape] = np.empty((*shape, self.vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        if self.inplace:  # past and present stay bound to one buffer per layer
            with running(self.graph):
                self.session.run_with_iobinding(binding)
            return logits
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        with running(self.graph):
            self.session.run_with_iobinding(binding)
        for name, value in zip(self.past_names, binding.get_outputs()[1:]):
            binding.bind_ortvalue_input(name, value)
        return logits


def lookup_columns(model: DecoderModel, batch: Batch, config: GenerationConfig, room: int, pad: int,
                   stopped: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """`generate`'s columns with prompt-lookup drafting: every row run through an engine of its own, in the
    caller's thread, and its tokens (EOS included) laid out as the generation loop lays them out, each column
    as soon as every row has its token. A row the caller marks in `stopped` is cancelled."""
    engine = Engine(model, max_running_rows=max(len(batch.ids), 1), prefix_cache_bytes=0,
                    prompt_lookup_num_tokens=config.prompt_lookup_num_tokens, background=False)
    names = list(batch.table.names)
    requests = [engine.submit(row[real == 1], names[task], min(config.max_new_tokens, room),
                              config.do_sample, config.temperature, config.top_k, config.top_p, config.seed,
                              config.repetition_penalty)
                for row, real, task in zip(batch.ids, batch.mask, batch.rows)]
    step = 0
    while True:
        while any(not r.finished and len(r.tokens) <= step for r in requests):
            if stopped is not None:
                for request, stop in zip(requests, stopped):
                    if stop:
                        request.cancel()
            engine.step()
        for request in requests:
            if request.error is not None:
                raise request.error
        if all(len(r.tokens) <= step for r in requests):
            return
        yield np.array([r.tokens[step] if step < len(r.tokens) else pad for r in requests], np.int64)
        step += 1
